"""One module per checkpoint file format: how its bytes become tensors."""
