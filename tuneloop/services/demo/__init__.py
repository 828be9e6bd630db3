"""The demo's data and its simulated traffic and users."""
