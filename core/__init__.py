"""The base layer every package may import: typed configs, checkpoints, user errors."""
