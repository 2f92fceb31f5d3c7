"""The one pass over the checkpoints: pairing tensors by name, reading each byte once, feeding every analysis."""
