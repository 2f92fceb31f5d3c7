"""ckptdiff: checkpoint forensics. What did this fine-tune actually do to the weights?"""

from __future__ import annotations

__version__ = "0.1.0"
