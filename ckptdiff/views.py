"""What the analyses compare: a checkpoint's tensors as logical values, whatever their storage.

:func:`logical` is applied to every checkpoint a command opens (``analyses.common.open_source`` and ``check
--header-only``): block-scaled FP8 weights read dequantized to fp32 with their scales hidden (:mod:`ckptdiff.fp8`),
and fused expert tensors read as one tensor per expert (:mod:`ckptdiff.moe`). A checkpoint with neither comes back
unchanged. A :class:`~ckptdiff.sources.Source` a library caller opens itself is used as given: pass it through
:func:`logical` to get the same view.
"""

from __future__ import annotations

from ckptdiff import fp8, moe
from ckptdiff.sources import Source


def logical(src: Source) -> Source:
    """``src`` as the analyses see it: FP8 weights dequantized, fused experts split (or ``src`` itself)."""
    return moe.split(fp8.wrap(src))
