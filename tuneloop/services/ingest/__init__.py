"""Ingest: feedback events from Kafka into the store, exactly once, bad ones kept as dead letters."""
