"""Update masks (docs/metrics.md §1) and magnitude bins (docs/metrics.md §2b), as pure tensor functions.

Everything here takes tensors and returns tensors or floats: no I/O, no device choice.
The streaming engine decides where the tensors live; these functions keep them there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch

from ckptdiff import dtypes
from ckptdiff.dtypes import INT_VIEW, short_name

Kind = Literal["bitwise", "rtol", "atol"]


# Lossless embeddings: (narrow, wide) pairs where every narrow value is exact in wide.


@dataclass(frozen=True)
class CompareMode:
    """How "unchanged" is decided: bitwise (default), relative (PNT) or absolute (MUK) tolerance.

    ``as_dtype`` rounds both sides to that storage dtype (round-to-nearest-even) before comparing.
    """

    kind: Kind = "bitwise"
    tol: float = 0.0
    as_dtype: torch.dtype | None = None

    def describe(self) -> str:
        """One line for report headers."""
        base = {"bitwise": "bitwise", "rtol": f"relative, rtol={self.tol:g}", "atol": f"absolute, atol={self.tol:g}"}[
            self.kind
        ]
        if self.as_dtype is not None:
            base += f", both sides rounded to {dtype_name(self.as_dtype)}"
        return base


dtype_name = short_name  # the one short-name table lives in ckptdiff.dtypes


def compare_mode(
    mode: CompareMode | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
) -> CompareMode:
    """The comparison mode from a ready ``mode`` or from ``rtol``/``atol``/``as_dtype`` (bitwise when none is given).

    ``rtol`` and ``atol`` are alternatives; ``as_dtype`` is bf16, fp16 or fp32 (a name or a torch dtype).
    """
    from ckptdiff import choices
    from ckptdiff.errors import InputError, option

    if mode is not None:
        if rtol is not None or atol is not None or as_dtype is not None:
            raise InputError("pass either mode= or rtol=/atol=/as_dtype=, not both")
        return mode
    if rtol is not None and atol is not None:
        raise InputError(
            f"{option('--rtol')} and {option('--atol')} are alternatives; pass one of them (or neither for bitwise)"
        )
    as_t = choices.as_dtype(as_dtype)
    if rtol is not None:
        return CompareMode("rtol", choices.tolerance("--rtol", rtol), as_t)
    if atol is not None:
        return CompareMode("atol", choices.tolerance("--atol", atol), as_t)
    return CompareMode("bitwise", 0.0, as_t)


def comparison_dtype(a: torch.dtype, b: torch.dtype, as_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype both sides are rounded to before comparing.

    ``as_dtype`` wins. Same dtypes compare natively. Otherwise the narrower side's dtype when the other
    contains it exactly (fp32 base vs bf16 fine-tune compares as bf16, as the fine-tune stores it), and fp32
    for a bf16/fp16 mix, which holds both exactly.
    """
    if as_dtype is not None:
        return as_dtype
    if a == b:
        return a
    if (a, b) in dtypes.WIDENS_EXACTLY:
        return a
    if (b, a) in dtypes.WIDENS_EXACTLY:
        return b
    return torch.float32


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def widened(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the fp8 dtypes (which torch cannot test for finiteness nor decompose), else ``dtype``."""
    return torch.float32 if dtype in _FP8 else dtype


def widen_fp8(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor upcast to fp32 (exact: every fp8 value, ±0, inf and NaN included, is an fp32 value), else ``t``.

    The upcast keeps every comparison: bit patterns map one to one, so update masks (bitwise or tolerance, with
    or without ``--as``) are the same as on the stored fp8 values.
    """
    return t.to(torch.float32) if t.dtype in _FP8 else t


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def bitwise_changed(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Changed-entry mask under the bitwise test: +0 and -0 equal, NaN on either side changed.

    Both tensors must share one float dtype (round them first) or be integer/bool (compared exactly).
    """
    if w0.dtype != w1.dtype:
        raise ValueError(f"bitwise_changed needs one dtype, got {w0.dtype} and {w1.dtype}")
    if not _is_float(w0.dtype):
        return w0 != w1
    iview = INT_VIEW[w0.element_size()]
    a = w0.view(iview)
    b = w1.view(iview)
    nbits = 8 * w0.element_size()
    # All bits but the sign: zero for +0 and -0 alike.
    magnitude_bits = torch.tensor((1 << (nbits - 1)) - 1, dtype=iview, device=w0.device)
    both_zero = ((a | b) & magnitude_bits) == 0
    return ((a != b) & ~both_zero) | torch.isnan(w0) | torch.isnan(w1)


def tolerance_changed(w0: torch.Tensor, w1: torch.Tensor, kind: Kind, tol: float) -> torch.Tensor:
    """Changed-entry mask under a tolerance: rtol |d| <= tol*max(|w0|,|w1|), atol |d| <= tol.

    Computed in float64. Bitwise-equal entries (and +0/-0) are unchanged; NaN on either side is changed.
    """
    x0 = w0.to(torch.float64)
    x1 = w1.to(torch.float64)
    diff = (x1 - x0).abs()
    bound = tol * torch.maximum(x0.abs(), x1.abs()) if kind == "rtol" else torch.full_like(diff, tol)
    within = diff <= bound  # False wherever diff is NaN (NaN input or inf - inf)
    same = x0 == x1  # inf == inf, +0 == -0
    return ~(within | same) | torch.isnan(x0) | torch.isnan(x1)


def update_mask(w0: torch.Tensor, w1: torch.Tensor, mode: CompareMode = CompareMode()) -> torch.Tensor:
    """The update mask M = 1[changed] of docs/metrics.md §1, same shape as the inputs (flattened shapes must match)."""
    if not (_is_float(w0.dtype) and _is_float(w1.dtype)):
        return w0 != w1  # integers and bools: exact value comparison
    target = comparison_dtype(w0.dtype, w1.dtype, mode.as_dtype)
    a = w0 if w0.dtype == target else w0.to(target)
    b = w1 if w1.dtype == target else w1.to(target)
    changed = bitwise_changed(a, b) if mode.kind == "bitwise" else tolerance_changed(a, b, mode.kind, mode.tol)
    hidden = overflow_hidden(w0, w1, a, b, changed)
    return changed if hidden is None else changed | hidden


def overflowed(w0: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Entries that rounding to a narrower dtype turned from finite into ±inf on either side (None: none can, or
    none did: no rounded entry is infinite).

    An fp8 side is tested on its exact fp32 value (torch has no ``isfinite`` for fp8).
    """
    if a.dtype == w0.dtype and b.dtype == w1.dtype:
        return None
    if _surely_finite(a) and _surely_finite(b):  # the common case, at a fraction of the cost of the masks below
        return None
    return (torch.isinf(a) & torch.isfinite(widen_fp8(w0))) | (torch.isinf(b) & torch.isfinite(widen_fp8(w1)))


_MINMAX = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _surely_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, decided from its minimum and maximum alone (one reduction; a NaN
    makes both NaN, and then this says no). False where undecided (fp8, which torch cannot reduce)."""
    if t.numel() == 0:
        return True
    if t.dtype not in _MINMAX:
        return False
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def overflow_hidden(
    w0: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, b: torch.Tensor, changed: torch.Tensor
) -> torch.Tensor | None:
    """Changes that ``--as`` rounding hid by overflowing: the stored values differ, yet both round to the same inf.

    Such an entry is never counted as unchanged: a value beyond the target dtype's range cannot be compared in it.
    """
    over = overflowed(w0, w1, a, b)
    if over is None or not bool(over.any()):
        return None
    native = bitwise_changed(w0.to(torch.float64), w1.to(torch.float64))  # every supported float is exact in fp64
    return over & native & ~changed


# ---------------------------------------------------------------------------------------------
# Magnitude bins (docs/metrics.md §2b)

ZERO_BIN = -2000  # the bin of exact zeros: below every finite exponent
NONFINITE_BIN = 2000  # inf and NaN
_BIN_OFFSET = -ZERO_BIN

# (mantissa bits, exponent field mask, bias) of each float layout.
_LAYOUT: dict[torch.dtype, tuple[int, int, int]] = {
    torch.bfloat16: (7, 0xFF, 127),
    torch.float16: (10, 0x1F, 15),
    torch.float32: (23, 0xFF, 127),
    torch.float64: (52, 0x7FF, 1023),
}


def exponent_bins(w0: torch.Tensor) -> torch.Tensor:
    """floor(log2|w0|) per entry as int16, read from the exponent bits of w0's own dtype.

    Within one bin a rounding step is the same size, which is what makes changes comparable. Exact zeros
    get ZERO_BIN and inf/NaN NONFINITE_BIN; subnormals share one bin just below the smallest normal
    exponent, since they all share one rounding step.

    Integer work only: the sign bit is cleared, the exponent field shifted down (in int16 from there on) and
    the bias removed, which already puts subnormals (field 0) at -bias; zeros and inf/NaN are then filled in.
    """
    if w0.dtype not in _LAYOUT:
        w0 = w0.to(torch.float32)
    mant_bits, exp_mask, bias = _LAYOUT[w0.dtype]
    nbits = 8 * w0.element_size()
    mag = w0.view(INT_VIEW[w0.element_size()]) & ((1 << (nbits - 1)) - 1)  # |w0|'s bit pattern, same shape
    bins = mag >> mant_bits  # the exponent field, 0..exp_mask
    if bins.dtype != torch.int16:
        bins = bins.to(torch.int16)
    bins -= bias  # field - bias; subnormals (field 0) land on -bias
    bins.masked_fill_(bins == exp_mask - bias, NONFINITE_BIN)
    return bins.masked_fill_(mag == 0, ZERO_BIN)  # |bins| <= 2000


_BIN_SLOTS = NONFINITE_BIN + _BIN_OFFSET + 1
_COUNT_PIECE = 1 << 24  # entries per bincount call: temporaries stay ~100 MB for any tensor size
_MAX_JOINT_MASKS = 3  # joint_bin_counts' limit (its generic keys are slot + 4096 * code in int32)
_BIG_ENDIAN = sys.byteorder == "big"


def bin_counts(bins: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-bin entry counts n_b and per-bin counts of each mask, as float64 tensors (exact below 2**53).

    One ``torch.bincount`` per mask on small integers: slot + _BIN_SLOTS * mask, whose two halves are the
    entries outside and inside the mask (their sum is n_b). Works through the entries in pieces so that the
    temporaries stay small for an embedding matrix too.
    """
    flat = bins.reshape(-1)
    flat_masks = [m.reshape(-1).to(torch.bool) for m in masks]
    n_b = torch.zeros(_BIN_SLOTS, dtype=torch.int64, device=bins.device)
    counts = [torch.zeros(_BIN_SLOTS, dtype=torch.int64, device=bins.device) for _ in masks]
    for s in range(0, flat.numel(), _COUNT_PIECE):
        dense = flat[s : s + _COUNT_PIECE] + _BIN_OFFSET  # (piece,) in 0.._BIN_SLOTS-1, int16 like bins
        if not flat_masks:
            n_b += torch.bincount(dense, minlength=_BIN_SLOTS)
        for j, (acc, m) in enumerate(zip(counts, flat_masks, strict=True)):
            split = torch.bincount(
                torch.add(dense, m[s : s + _COUNT_PIECE], alpha=_BIN_SLOTS), minlength=2 * _BIN_SLOTS
            )
            acc += split[_BIN_SLOTS:]
            if j == 0:
                n_b += split[:_BIN_SLOTS] + split[_BIN_SLOTS:]
    return n_b.to(torch.float64), [c.to(torch.float64) for c in counts]


def _half_slots(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 256) int64: the bin slot of exponent field f with all-zero (row 0) or non-zero (row 1) mantissa bits.

    Read off exponent_bins itself on one bit pattern per (row, field), so the two paths cannot disagree.
    """
    mant_bits, exp_mask, _ = _LAYOUT[dtype]
    field = torch.arange(256, dtype=torch.int32, device=device).clamp_max(exp_mask)  # fields above exp_mask: unused
    patterns = torch.stack([field << mant_bits, (field << mant_bits) | 1])  # (2, 256)
    return exponent_bins(patterns.to(torch.int16).view(dtype)).to(torch.int64) + _BIN_OFFSET


def _mask_code(masks: list[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """(n,) uint8 with bit i set where masks[i] is (each mask a flat 0/1 uint8 view)."""
    if not masks:
        return torch.zeros(n, dtype=torch.uint8, device=device)
    code = masks[0].clone() if len(masks) == 1 else torch.add(masks[0], masks[1], alpha=2)
    for i, m in enumerate(masks[2:], start=2):
        code.add_(m, alpha=1 << i)
    return code


def joint_bin_counts(w0: torch.Tensor, *masks: torch.Tensor, bins: torch.Tensor | None = None) -> torch.Tensor:
    """Per-bin counts of every combination of up to 3 masks: (2**len(masks), _BIN_SLOTS) int64.

    Row c, slot b counts the entries of exponent bin b (slot b = bin + 2000, see exponent_bins) whose membership
    in the masks is the bit pattern c (bit i set: in ``masks[i]``). Sums of rows give n_b, each mask's per-bin
    count and the per-bin count of any intersection, from one ``torch.bincount`` over small integer keys.
    ``bins`` are exponent_bins(w0) if already known.

    For bf16/fp16 the 16-bit key holds the exponent field (shifted down from the bits) in its low byte and the
    mask bits in its high byte. Field 0 holds both zeros and subnormals: when it is not empty, its entries alone are
    split by their mantissa bits. The (field, mantissa) -> slot table comes from exponent_bins. Any other dtype, or
    given ``bins``, is keyed by slot + 4096 * c.
    """
    if len(masks) > _MAX_JOINT_MASKS:
        raise ValueError(f"at most {_MAX_JOINT_MASKS} masks, got {len(masks)}")
    rows = 1 << len(masks)
    flat_w = w0.reshape(-1)
    flat_masks = [m.reshape(-1).to(torch.bool).view(torch.uint8) for m in masks]  # 0/1 bytes
    if bins is None and w0.dtype in (torch.bfloat16, torch.float16) and not _BIG_ENDIAN:
        mant_bits, exp_mask, _ = _LAYOUT[w0.dtype]
        hist = torch.zeros(rows * 256, dtype=torch.int64, device=w0.device)  # [code, field], any mantissa
        sub = torch.zeros(rows, dtype=torch.int64, device=w0.device)  # per code: field 0, mantissa not zero
        for s in range(0, flat_w.numel(), _COUNT_PIECE):
            bits = flat_w[s : s + _COUNT_PIECE].view(torch.int16)
            key = (bits >> mant_bits).bitwise_and_(exp_mask)  # (piece,) the exponent field; high byte zero
            code = _mask_code([m[s : s + _COUNT_PIECE] for m in flat_masks], key.numel(), w0.device)
            key.view(torch.uint8).view(-1, 2)[:, 1].copy_(code)  # high byte (little-endian): field + 256 * code
            counts = torch.bincount(key, minlength=rows * 256)
            hist += counts
            if int(counts.view(rows, 256)[:, 0].sum()):  # zeros or subnormals in this piece: split them
                at = torch.nonzero((bits & 0x7FFF) < (1 << mant_bits)).squeeze(1)  # field 0, (n0,)
                subnormal = (bits[at] & ((1 << mant_bits) - 1)) != 0
                sub += torch.bincount(code[at][subnormal], minlength=rows)
        table = _half_slots(w0.dtype, w0.device)  # (2, 256)
        by_field = hist.view(rows, 256)
        by_field[:, 0] -= sub  # field 0 now counts the zeros only
        out = torch.zeros(rows, _BIN_SLOTS, dtype=torch.int64, device=w0.device)
        out.index_add_(1, table[0], by_field)
        out[:, int(table[1, 0])] += sub
        return out
    width = 4096  # > _BIN_SLOTS
    slots = (exponent_bins(w0) if bins is None else bins).reshape(-1)
    hist = torch.zeros(rows * width, dtype=torch.int64, device=slots.device)
    for s in range(0, slots.numel(), _COUNT_PIECE):
        key = slots[s : s + _COUNT_PIECE].to(torch.int32) + _BIN_OFFSET  # (piece,)
        for i, m in enumerate(flat_masks):
            key.add_(m[s : s + _COUNT_PIECE], alpha=width << i)
        hist += torch.bincount(key, minlength=rows * width)
    return hist.view(rows, width)[:, :_BIN_SLOTS].clone()


def matched_overlap(n_b: torch.Tensor, u_b: torch.Tensor, c_b: torch.Tensor) -> float:
    """(Σ_b u_b c_b / n_b) / Σ_b u_b from float64 per-bin counts (bin_counts' layout); NaN when Σ u_b = 0."""
    total = float(u_b.sum())
    if total == 0:
        return float("nan")
    return float((u_b * c_b / n_b.clamp_min(1)).sum()) / total


def magnitude_matched_overlap(bins: torch.Tensor, update: torch.Tensor, region: torch.Tensor) -> float:
    """Expected |U ∩ C| / |U| if the changes fell at random within each magnitude bin.

    (Σ_b u_b c_b / n_b) / Σ_b u_b; NaN when nothing changed.
    """
    n_b, (u_b, c_b) = bin_counts(bins, update, region)
    return matched_overlap(n_b, u_b, c_b)


def magnitude_matched_intersection(bins: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Expected |A ∩ B| if both masks kept their per-bin counts but fell independently at random: Σ_b a_b b_b / n_b."""
    n_b, (a_b, b_b) = bin_counts(bins, a, b)
    return float((a_b * b_b / n_b.clamp_min(1)).sum())
