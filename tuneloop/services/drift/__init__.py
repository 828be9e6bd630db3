"""Drift: embeddings, the novel-share test, and the clusters that drifted."""
