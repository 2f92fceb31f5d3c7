"""What a sparse patch of one tensor would cost: the one home of the encoding sizes.

A patch replaces the changed entries of a tensor with the fine-tune's stored values. Three encodings, each exact:

- ``sparse``: flat row-major indices (int32 when the tensor has fewer than 2**31 entries, else int64) + values;
- ``bitmask``: one bit per entry (ceil(numel / 8) bytes) + values;
- ``dense``: the whole tensor as stored.

The cheapest is chosen; ties go to the earlier in that order. Sizes are payload bytes, without container headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Encoding = Literal["none", "sparse", "bitmask", "dense"]
INT32_LIMIT = 2**31


def index_itemsize(numel: int) -> int:
    """Bytes of one flat index into a tensor of ``numel`` entries: 4 below 2**31 entries, else 8."""
    return 4 if numel < INT32_LIMIT else 8


@dataclass(frozen=True)
class PatchCost:
    numel: int
    changed: int
    itemsize: int
    sparse: int
    bitmask: int
    dense: int
    choice: Encoding

    @property
    def bytes(self) -> int:
        """Bytes of the chosen encoding (0 when nothing changed)."""
        return {"none": 0, "sparse": self.sparse, "bitmask": self.bitmask, "dense": self.dense}[self.choice]


def patch_cost(numel: int, changed: int, itemsize: int) -> PatchCost:
    """The bytes each encoding of ``changed`` replaced entries out of ``numel`` (each ``itemsize`` bytes) takes."""
    if numel < 0 or changed < 0 or changed > numel or itemsize <= 0:
        raise ValueError(f"patch_cost: need 0 <= changed <= numel and itemsize > 0, got {changed}, {numel}, {itemsize}")
    values = changed * itemsize
    sparse = changed * index_itemsize(numel) + values
    bitmask = -(-numel // 8) + values
    dense = numel * itemsize
    if changed == 0:
        choice: Encoding = "none"
    else:
        best = min(sparse, bitmask, dense)
        choice = "sparse" if sparse == best else "bitmask" if bitmask == best else "dense"
    return PatchCost(numel, changed, itemsize, sparse, bitmask, dense, choice)
