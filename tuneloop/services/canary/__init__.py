"""The canary's decisions, statistics and records."""
