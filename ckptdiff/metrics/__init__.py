"""Pure metric functions: tensors in, tensors, floats or frozen dataclasses out."""
