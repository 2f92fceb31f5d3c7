"""What a sparse patch of one tensor would cost, and which entries it replaces: the one home of encoding sizes.

A patch replaces the changed entries of a tensor with the fine-tune's stored values. Three encodings are written,
each exact:

- ``sparse``: flat row-major indices (int32 when the tensor has fewer than 2**31 entries, else int64) + values;
- ``bitmask``: one bit per entry (ceil(numel / 8) bytes) + values;
- ``dense``: the whole tensor as stored.

The cheapest is chosen; ties go to the earlier in that order. Sizes are payload bytes, without container headers.

One more is sized but not written (``gaps``): the distance from each changed index to the previous one, minus
one, as a uint16; a distance that does not fit (``>= 0xFFFF``) is the escape word ``0xFFFF`` followed by the
absolute index (int32 or int64 as above). Its size needs the indices, so it is known only when
:func:`gap_escapes` has counted the escapes.

"Changed" means the stored bits differ (:func:`changed_mask`): NaN payloads, the sign of zero and every bit of an
FP8 code or an integer count, so that replacing the changed entries rebuilds the fine-tune bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ckptdiff.dtypes import INT_VIEW

Encoding = Literal["none", "sparse", "bitmask", "dense"]
ENCODINGS: tuple[Encoding, ...] = ("sparse", "bitmask", "dense")
INT32_LIMIT = 2**31
GAP_ESCAPE = 0xFFFF  # a uint16 gap word this large says "the absolute index follows"


def index_itemsize(numel: int) -> int:
    """Bytes of one flat index into a tensor of ``numel`` entries: 4 below 2**31 entries, else 8."""
    return 4 if numel < INT32_LIMIT else 8


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into a tensor of ``numel`` entries (int32 below 2**31, else int64)."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


@dataclass(frozen=True)
class PatchCost:
    numel: int
    changed: int
    itemsize: int
    sparse: int
    bitmask: int
    dense: int
    choice: Encoding
    gaps: int | None = None  # bytes of the uint16 gap encoding + values, when the escapes were counted

    @property
    def bytes(self) -> int:
        """Bytes of the chosen encoding (0 when nothing changed)."""
        return {"none": 0, "sparse": self.sparse, "bitmask": self.bitmask, "dense": self.dense}[self.choice]


def patch_cost(numel: int, changed: int, itemsize: int, *, escapes: int | None = None) -> PatchCost:
    """The bytes each encoding of ``changed`` replaced entries out of ``numel`` (each ``itemsize`` bytes) takes.

    ``escapes``: how many gaps did not fit a uint16 word (:func:`gap_escapes`), to size the gap encoding too.
    """
    if numel < 0 or changed < 0 or changed > numel or itemsize <= 0:
        raise ValueError(f"patch_cost: need 0 <= changed <= numel and itemsize > 0, got {changed}, {numel}, {itemsize}")
    if escapes is not None and not 0 <= escapes <= changed:
        raise ValueError(f"patch_cost: need 0 <= escapes <= changed, got {escapes} of {changed}")
    values = changed * itemsize
    sparse = changed * index_itemsize(numel) + values
    bitmask = -(-numel // 8) + values
    dense = numel * itemsize
    gaps = None if escapes is None else 2 * changed + escapes * index_itemsize(numel) + values
    if changed == 0:
        choice: Encoding = "none"
    else:
        best = min(sparse, bitmask, dense)
        choice = "sparse" if sparse == best else "bitmask" if bitmask == best else "dense"
    return PatchCost(numel, changed, itemsize, sparse, bitmask, dense, choice, gaps)


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s stored bits as an integer tensor of the same width (bool as uint8)."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(INT_VIEW[t.element_size()])


def stored_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's stored bits, flat, as a numpy array of unsigned integers of the same width (no copy)."""
    return bits(t.reshape(-1)).numpy().view(f"u{t.element_size()}")


def changed_mask(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Where the stored bits of two same-dtype tensors differ (NaN payloads and -0.0 included), as bools."""
    _same_kind(w0, w1)
    return bits(w0) != bits(w1)


def changed_indices(w0: torch.Tensor, w1: torch.Tensor) -> np.ndarray:
    """The flat indices (int64, sorted) where the stored bits of two same-dtype CPU tensors differ."""
    _same_kind(w0, w1)
    return np.flatnonzero(stored_bits(w0) != stored_bits(w1))


def _same_kind(w0: torch.Tensor, w1: torch.Tensor) -> None:
    if w0.dtype != w1.dtype or w0.shape != w1.shape:
        raise ValueError(
            f"changed entries: need one dtype and shape, got {w0.dtype}{list(w0.shape)} and {w1.dtype}{list(w1.shape)}"
        )


def gap_escapes(indices: np.ndarray | torch.Tensor, previous: int = -1) -> int:
    """How many of the sorted flat ``indices`` lie ``0xFFFF + 1`` or more past the index before them.

    ``previous`` is the changed index just before the first one (from an earlier chunk), or -1 for none: the first
    gap of a tensor is counted from index -1, so index 0 has gap 0.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return 0
    return int(np.count_nonzero(np.diff(idx, prepend=np.int64(previous)) - 1 >= GAP_ESCAPE))
