"""The loop's stages, a folder each: a pure core plus a thin I/O shell."""
