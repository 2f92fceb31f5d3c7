"""Worked examples for ckptdiff (not part of the installed package)."""
