"""Curation: feedback into versioned training sets, and the golden set."""
