"""Analyses: each streams checkpoints through the engine, applies pure metrics, and returns a result."""
