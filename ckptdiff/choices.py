"""The options every analysis shares, typed and checked in one place with one wording.

The CLI passes what the user typed; the library functions call these, so a notebook user and a shell user
get the same one-line :class:`~ckptdiff.errors.InputError` for the same bad value, naming the flag on the command
line and the keyword argument in a library call (:func:`ckptdiff.errors.option`).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from ckptdiff.errors import InputError, option

SvdMethod = Literal["exact", "randomized", "auto"]
Precision = Literal["fp32", "fp64"]
NullKind = Literal["none", "random"]
AsName = Literal["bf16", "fp16", "fp32"]

DEFAULT_K = 64  # top-k singular directions, principal-overlap and spectral alike
MAX_BUDGET_GIB = 2**20  # --batch-budget: 1 PiB, more memory than any machine has
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp64": torch.float64}
AS_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _one_of(flag: str, value: object, allowed: tuple[str, ...], why: str = "") -> str:
    if isinstance(value, str) and value.lower() in allowed:
        return value.lower()
    raise InputError(f"{option(flag)} must be one of {', '.join(allowed)}, got {value!r}{why}")


def k_value(k: object) -> int:
    """--k: a positive integer (capped at min(m, n) per matrix by the analyses)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"{option('--k')} must be a positive integer, got {k!r}; it is capped at min(m, n) per matrix")
    return k


def positive_int(value: object, flag: str) -> int:
    """A flag that takes a positive integer (``--intruder-k``, ``--intruder-base-k``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag} must be a positive integer, got {value!r}")
    return value


def unit_interval(value: object, flag: str) -> float:
    """A flag that takes a number strictly between 0 and 1 (``--intruder-eps``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise InputError(f"{flag} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def alpha_value(alpha: object) -> float:
    """--alpha: a mask density strictly between 0 and 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise InputError(f"{option('--alpha')} must lie strictly between 0 and 1, got {alpha!r}; PNT uses 0.5")
    return float(alpha)


def svd_method(svd: object) -> SvdMethod:
    """--svd: exact, randomized or auto."""
    return _one_of("--svd", svd, get_args(SvdMethod))  # type: ignore[return-value]


def precision_dtype(precision: object, flag: str = "--precision") -> torch.dtype:
    """--precision: the SVD dtype, fp32 or fp64 (SVDs never run in bf16 or fp16)."""
    name = _one_of(flag, precision, get_args(Precision), " (SVDs never run in bf16 or fp16)")
    return PRECISIONS[name]


def null_kind(null: object) -> bool:
    """--null: none or random (True/False accepted from Python); whether the random null runs."""
    if isinstance(null, bool):
        return null
    return _one_of("--null", null, get_args(NullKind)) == "random"


def as_dtype(value: object) -> torch.dtype | None:
    """--as: round both sides to bf16, fp16 or fp32 first; a torch dtype among those passes through."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in AS_DTYPES.values():
            return value
        raise InputError(f"{option('--as')} must be one of {', '.join(AS_DTYPES)}, got {value}")
    return AS_DTYPES[_one_of("--as", value, tuple(AS_DTYPES))]


def merged_dtype(value: object) -> torch.dtype | None:
    """--merged-dtype: what a PEFT adapter's merged weights are stored as, bf16, fp16 or fp32 (None: the base's)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in AS_DTYPES.values():
            return value
        raise InputError(f"--merged-dtype must be one of {', '.join(AS_DTYPES)}, got {value}")
    return AS_DTYPES[_one_of("--merged-dtype", value, tuple(AS_DTYPES))]


def tolerance(flag: str, value: object) -> float:
    """--rtol / --atol: a finite, non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise InputError(f"{option(flag)} must be a finite non-negative number, got {value!r}")
    return float(value)


def batch_budget_bytes(gib: object) -> int:
    """--batch-budget: GiB one batch of matrices may use, more than 0 and at most ``MAX_BUDGET_GIB``; as bytes."""
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib <= MAX_BUDGET_GIB:
        raise InputError(
            f"{option('--batch-budget')} must be a number of GiB above 0 and at most {MAX_BUDGET_GIB:,} (1 PiB), "
            f"got {gib!r}"
        )
    return int(gib * 1024**3)
