"""The adapter registry: artifacts, manifests and deployment states."""
