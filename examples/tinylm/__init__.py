"""A miniature RL-vs-SFT fine-tuning experiment that produces bf16 checkpoints for ckptdiff.

Run ``python -m examples.tinylm.train all --out examples/checkpoints`` from the repository root.
"""
