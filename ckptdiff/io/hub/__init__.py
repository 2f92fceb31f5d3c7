"""Hugging Face Hub ids: a snapshot downloaded into the cache, or tensors read by byte range."""
