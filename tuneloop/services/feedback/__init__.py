"""The feedback event contract, its fast decoder, redaction, the producer SDK and topic admin."""
