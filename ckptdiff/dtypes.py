"""Storage dtypes: safetensors names, torch dtypes, integer bit views."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    """One storage dtype as safetensors names it, with its torch and numpy bit-level equivalents."""

    name: str  # safetensors spelling: "BF16"
    torch: torch.dtype
    itemsize: int
    is_float: bool
    bits_np: np.dtype  # unsigned integer view of the same width, for bitwise work

    @property
    def short(self) -> str:
        """Lower-case short name: 'bf16', 'fp32', 'i64'."""
        return _SHORT.get(self.name, self.name.lower())


def _u(itemsize: int) -> np.dtype:
    return np.dtype(f"u{itemsize}")


_TABLE: list[tuple[str, torch.dtype, int, bool]] = [
    ("BOOL", torch.bool, 1, False),
    ("U8", torch.uint8, 1, False),
    ("I8", torch.int8, 1, False),
    ("I16", torch.int16, 2, False),
    ("U16", torch.uint16, 2, False),
    ("I32", torch.int32, 4, False),
    ("U32", torch.uint32, 4, False),
    ("I64", torch.int64, 8, False),
    ("U64", torch.uint64, 8, False),
    ("F16", torch.float16, 2, True),
    ("BF16", torch.bfloat16, 2, True),
    ("F32", torch.float32, 4, True),
    ("F64", torch.float64, 8, True),
    ("F8_E4M3", torch.float8_e4m3fn, 1, True),
    ("F8_E5M2", torch.float8_e5m2, 1, True),
]

_SHORT = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64", "BOOL": "bool"}

BY_NAME: dict[str, DType] = {n: DType(n, t, s, f, _u(s)) for n, t, s, f in _TABLE}
BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in BY_NAME.values()}


# Signed integer views of each width, for bit-level arithmetic on float encodings (uint8 for the 1-byte
# formats, whose codes are compared, never subtracted).
INT_VIEW: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def short_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype as every report writes it: torch.bfloat16 -> 'bf16', torch.int64 -> 'i64'."""
    found = BY_TORCH.get(dtype)
    return found.short if found is not None else str(dtype).removeprefix("torch.")


def from_name(name: str) -> DType | None:
    """The DType for a safetensors dtype string, or None if unknown."""
    return BY_NAME.get(name)


def from_torch(dtype: torch.dtype) -> DType | None:
    """The DType for a torch dtype, or None if ckptdiff does not handle it."""
    return BY_TORCH.get(dtype)


# (narrow, wide): every value of the narrow float dtype is a value of the wide one, so widening loses nothing.
WIDENS_EXACTLY: frozenset[tuple[torch.dtype, torch.dtype]] = frozenset(
    {
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float16, torch.float64),
        (torch.float32, torch.float64),
    }
)
