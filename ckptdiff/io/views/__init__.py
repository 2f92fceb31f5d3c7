"""What a checkpoint's stored tensors are as values: tied names, block-scaled FP8, fused experts, config.json."""
