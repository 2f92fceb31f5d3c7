"""ckptdiff: checkpoint forensics. What did this fine-tune actually do to the weights?

The library is the product; the CLI is one client of it::

    import ckptdiff
    result = ckptdiff.sparsity("base/", "ft/")
    result.to_frame()          # one row per tensor
    result.overall()           # parameter-weighted totals
    ckpt = ckptdiff.open("ft/")  # a checkpoint as the analyses see it (ties, FP8 dequantized, experts split)

Attributes are imported lazily so that ``import ckptdiff`` (and ``ckptdiff --help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "sparsity": ("ckptdiff.analyses.sparsity", "sparsity"),
    "principal_overlap": ("ckptdiff.analyses.principal", "principal_overlap"),
    "spectral": ("ckptdiff.analyses.spectral", "spectral"),
    "consistency": ("ckptdiff.analyses.consistency", "consistency"),
    "check": ("ckptdiff.gate.check", "check"),
    "full_report": ("ckptdiff.analyses.full", "full_report"),
    "patch_create": ("ckptdiff.analyses.patch", "patch_create"),
    "patch_apply": ("ckptdiff.analyses.patch", "patch_apply"),
    "patch_verify": ("ckptdiff.analyses.patch", "patch_verify"),
    "patch_size": ("ckptdiff.analyses.patch", "patch_size"),
    "trajectory": ("ckptdiff.analyses.trajectory", "trajectory"),
    "open": ("ckptdiff.io.resolve", "open"),
    "resolve": ("ckptdiff.io.resolve", "open"),  # the same front door under its earlier name
    "CompareMode": ("ckptdiff.metrics.mask", "CompareMode"),
    "CkptdiffError": ("ckptdiff.errors", "CkptdiffError"),
    "InputError": ("ckptdiff.errors", "InputError"),
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    """The lazily loaded names too, so ``dir(ckptdiff)`` and tab completion show the whole API."""
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'ckptdiff' has no attribute {name!r}")
