"""The DuckDB file every stage shares, its tables and migrations."""
