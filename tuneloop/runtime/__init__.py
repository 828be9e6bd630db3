"""Shared runtime helpers below every stage: settings, logs, processes, CPU binding."""
