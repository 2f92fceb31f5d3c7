"""What the analyses compare: a checkpoint's tensors as logical values, whatever their storage.

:func:`logical` is applied to every checkpoint a command opens (``analyses.common.open_source`` and ``check
--header-only``): an ``lm_head.weight`` that ``config.json`` declares tied to the input embedding recorded as such
(:mod:`ckptdiff.io.views.ties`; aliases of one storage in a ``.bin`` are recorded when it is opened), block-scaled FP8
weights read dequantized to fp32 with their scales hidden (:mod:`ckptdiff.io.views.fp8`), and fused expert tensors
read as one tensor per expert (:mod:`ckptdiff.io.views.moe`). A checkpoint with none of these comes back unchanged. A
:class:`~ckptdiff.io.source.Source` a library caller opens itself is used as given: pass it through :func:`logical`
to get the same view.
"""

from __future__ import annotations

from ckptdiff.io.source import Source
from ckptdiff.io.views import fp8, moe, ties


def logical(src: Source) -> Source:
    """``src`` as the analyses see it: ties declared, FP8 weights dequantized, fused experts split (or ``src``
    itself)."""
    return moe.split(fp8.wrap(ties.declare(src)))
