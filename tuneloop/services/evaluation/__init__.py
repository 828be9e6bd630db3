"""Task metrics, one implementation for training and the canary."""
