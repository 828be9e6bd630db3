"""The loop's policy and figures."""
