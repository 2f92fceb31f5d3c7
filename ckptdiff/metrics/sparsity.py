"""Update sparsity counts (docs/metrics.md §1) for one flat chunk of a tensor pair, as a pure function.

The counts add up across chunks, so a tensor of any size is measured in bounded memory.
On the CPU, bf16/fp16/fp32/fp64 pairs (after any rounding to the comparison dtype) are counted from their
raw bit patterns in one compiled pass per chunk when numba is installed (:mod:`ckptdiff.metrics._kernels`,
bitwise and rtol/atol tests alike): no torch calls, and the GIL released while it counts. Without numba, or
with the environment variable ``CKPTDIFF_NO_NUMBA=1`` (read at each call), the bitwise test runs on numpy
integer views in cache-sized pieces; every other case (GPU, tolerances, fp8 tolerances) goes through
:func:`update_mask` in torch. All paths define "changed" identically; tests check that they agree exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from types import ModuleType

import numpy as np
import torch

from ckptdiff.metrics.mask import (
    CompareMode,
    bitwise_changed,
    comparison_dtype,
    overflow_hidden,
    overflowed,
    tolerance_changed,
)

# ULP-distance buckets for changed entries: 1, 2, 3-4, 5-16, more than 16 representable steps apart.
ULP_LABELS = ("ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16")
_PIECE = 1 << 18  # entries per numpy piece: the operands and temporaries stay in L2 (measured best of 64K..1M)


@dataclass(frozen=True)
class ChangeCounts:
    """Counts over a set of entries: how many changed, and how far in ULPs of the compared dtype."""

    numel: int = 0
    changed: int = 0
    ulp_1: int = 0
    ulp_2: int = 0
    ulp_3_4: int = 0
    ulp_5_16: int = 0
    ulp_gt16: int = 0
    changed_nonfinite: int = 0  # changes involving a NaN (no ULP distance)
    overflow_as: int = 0  # entries that overflowed the --as dtype on either side (each changed one is in changed)

    def __add__(self, other: ChangeCounts) -> ChangeCounts:
        return ChangeCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def sparsity(self) -> float:
        """Fraction unchanged, 1 - changed/numel; NaN for an empty set."""
        return 1.0 - self.changed / self.numel if self.numel else float("nan")


_INF_BITS: dict[torch.dtype, int] = {
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
    torch.float8_e5m2: 0x7C,
    torch.float8_e4m3fn: 0x7E,  # e4m3fn has no inf; 0x7F is its NaN
}
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _magnitude_and_sign(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude bits (int64) and sign bit (bool) of a float tensor's IEEE encoding."""
    nbits = 8 * t.element_size()
    bits = t.view(_SIGNED[t.element_size()]).to(torch.int64)
    mag = bits & ((1 << (nbits - 1)) - 1)
    return mag, bits < 0


def summarise_changed(a: torch.Tensor, b: torch.Tensor) -> ChangeCounts:
    """ULP buckets and NaN count for 1-D pairs already known to be changed (one float dtype).

    The ULP distance is the number of representable values between a and b: |mag_a - mag_b| for equal
    signs, mag_a + mag_b across zero (wrapping past int64 only for fp64, counted as > 16).
    """
    inf = _INF_BITS[a.dtype]
    ma, sa = _magnitude_and_sign(a)
    mb, sb = _magnitude_and_sign(b)
    nan = (ma > inf) | (mb > inf)
    n_nan = int(torch.count_nonzero(nan))
    dist = torch.where(sa == sb, (ma - mb).abs(), ma + mb)
    dist = torch.where(dist < 0, torch.iinfo(torch.int64).max, dist)[~nan]
    c1 = int(torch.count_nonzero(dist == 1))
    c2 = int(torch.count_nonzero(dist == 2))
    c4 = int(torch.count_nonzero((dist > 2) & (dist <= 4)))
    c16 = int(torch.count_nonzero((dist > 4) & (dist <= 16)))
    n = int(a.numel())
    return ChangeCounts(0, n, c1, c2, c4, c16, n - n_nan - c1 - c2 - c4 - c16, n_nan)


_NEAR = 16  # ULP distances up to this are counted straight from the bit difference


def _exact_counts(x: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> ChangeCounts:
    """Changed counts and ULP buckets (numel left 0) by compressing to the differing pairs; handles every case."""
    mag_mask = x.dtype.type((1 << (x.dtype.itemsize * 8 - 1)) - 1)
    m = x != y
    cx, cy = x[m], y[m]
    zero_pair = ((cx | cy) & mag_mask) == 0  # +0 vs -0: equal
    cx, cy = cx[~zero_pair], cy[~zero_pair]
    signed = f"i{x.dtype.itemsize}"
    ta = torch.from_numpy(cx.view(signed)).view(dtype)
    tb = torch.from_numpy(cy.view(signed)).view(dtype)
    out = summarise_changed(ta, tb)
    nan_same = int(np.count_nonzero(((x & mag_mask) > _INF_BITS[dtype]) & ~m))  # bit-identical NaNs
    return out + ChangeCounts(changed=nan_same, changed_nonfinite=nan_same)


def _bitwise_counts_numpy(w0: torch.Tensor, w1: torch.Tensor) -> ChangeCounts:
    """Bitwise counts on the CPU with numpy integer views, in cache-sized pieces.

    |x - y| of the raw bit patterns (wrapping) is the ULP distance for equal signs. Pairs at distance
    <= 16 are counted straight from it; everything else (sign flips, +0/-0, far moves, NaN on the
    fine-tuned side) goes through the exact path. A pair at distance <= 16 can involve a NaN, or be a
    bit-identical NaN, only if one side is within 16 steps of inf (a NaN whose payload is nearly all ones
    sits 16 wrapped steps from a tiny value of the other sign): pieces with such a value on either side
    go entirely through the exact path.
    """
    size = w0.element_size()
    udt = np.dtype(f"u{size}")
    sdt = _SIGNED[size]
    a = w0.reshape(-1).view(sdt).numpy().view(udt)  # (n,) raw bits
    b = w1.reshape(-1).view(sdt).numpy().view(udt)
    nbits = 8 * size
    limit = _INF_BITS[w0.dtype] - _NEAR  # magnitudes at or above this are near inf/NaN
    neg_limit = (1 << (nbits - 1)) + limit
    signed = f"i{size}"
    exact = ChangeCounts()
    n_near = c1 = c2 = c4 = c16 = 0  # plain ints: a dataclass per piece costs more than the piece's arithmetic
    dbuf = np.empty(min(_PIECE, a.size), dtype=udt)
    for s in range(0, a.size, _PIECE):
        x, y = a[s : s + _PIECE], b[s : s + _PIECE]
        k = int(x.size)
        # Near inf on either side? Two maxima per side: the signed view for positive values, the unsigned
        # view for negative ones (cheaper than any elementwise pass).
        if (
            int(x.view(signed).max()) >= limit
            or int(x.max()) >= neg_limit
            or int(y.view(signed).max()) >= limit
            or int(y.max()) >= neg_limit
        ):
            exact = exact + _exact_counts(x, y, w0.dtype)
            continue
        d = dbuf[:k]
        np.subtract(x, y, out=d)
        ds = d.view(signed)
        np.abs(ds, out=ds)  # |x - y| as unsigned; the most negative value stays large, as wanted
        zero = k - int(np.count_nonzero(d))
        p1 = int(np.count_nonzero(d == 1))
        p2 = int(np.count_nonzero(d == 2))
        p4 = int(np.count_nonzero(d <= 4))
        p16 = int(np.count_nonzero(d <= _NEAR))
        n_near += p16 - zero
        c1 += p1
        c2 += p2
        c4 += p4 - p2 - p1 - zero
        c16 += p16 - p4
        if p16 < k:
            far = d > _NEAR
            exact = exact + _exact_counts(x[far], y[far], w0.dtype)
    return exact + ChangeCounts(int(a.size), n_near, c1, c2, c4, c16, 0, 0)


_NO_NUMBA_ENV = "CKPTDIFF_NO_NUMBA"
_kernel_module: list[ModuleType | None] = []  # filled on first use: the import is deferred, and tried once


def _compiled_kernels() -> ModuleType | None:
    """The numba kernels module, or None when numba is missing or switched off with ``CKPTDIFF_NO_NUMBA``."""
    if os.environ.get(_NO_NUMBA_ENV, "") not in ("", "0"):
        return None
    if not _kernel_module:
        try:
            from ckptdiff.metrics import _kernels
        except (ImportError, OSError):  # numba absent, or present but unusable (llvmlite, numpy version)
            _kernel_module.append(None)
        else:
            _kernel_module.append(_kernels)
    return _kernel_module[0]


def _kernel_args(dtype: torch.dtype) -> tuple[np.generic, np.generic, np.generic]:
    """(mag_mask, inf, big) for :func:`ckptdiff.metrics._kernels.bitwise_counts`, in the bits' own dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    u = np.dtype(f"u{size}").type
    return u((1 << (8 * size - 1)) - 1), u(_INF_BITS[dtype]), u((1 << (8 * size)) - 1)


# The compiled kernel's dtypes; fp8 takes the numpy path (its 8-bit per-block counters would overflow).
_KERNEL_ARGS = {dtype: _kernel_args(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 1-D float tensor's raw bit patterns as a contiguous unsigned numpy view (no copy when contiguous)."""
    t = t.reshape(-1)
    if not t.is_contiguous():
        t = t.contiguous()
    size = t.element_size()
    return t.view(_SIGNED[size]).numpy().view(f"u{size}")


def _from_kernel(n: int, out: tuple[int, ...]) -> ChangeCounts:
    """ChangeCounts from a kernel's (d == 0, d <= 1, d <= 2, d <= 4, d <= 16, NaN) entry counts."""
    c0, c1, c2, c4, c16, nan = (int(c) for c in out)
    return ChangeCounts(n, n - c0, c1 - c0, c2 - c1, c4 - c2, c16 - c4, n - c16 - nan, nan)


def _bitwise_counts_compiled(kernels: ModuleType, w0: torch.Tensor, w1: torch.Tensor) -> ChangeCounts:
    """Bitwise counts on the CPU in one compiled pass over the bit patterns (same dtype both sides)."""
    a, b = _bits(w0), _bits(w1)
    return _from_kernel(int(a.size), kernels.bitwise_counts(a, b, *_KERNEL_ARGS[w0.dtype]))


def _values(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The values of bit patterns as float32 or float64 (exact): a view, or one numpy conversion for 16 bits."""
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of an fp32
    if dtype == torch.float16:
        return bits.view(np.float16).astype(np.float32)
    return bits.view(np.float32 if dtype == torch.float32 else np.float64)


def _tolerance_counts_compiled(
    kernels: ModuleType, w0: torch.Tensor, w1: torch.Tensor, kind: str, tol: float
) -> ChangeCounts:
    """rtol/atol counts on the CPU in one compiled pass (same dtype both sides), as :func:`tolerance_changed`."""
    a, b = _bits(w0), _bits(w1)
    v0, v1 = _values(a, w0.dtype), _values(b, w0.dtype)
    out = kernels.tolerance_counts(a, b, v0, v1, kind == "rtol", float(tol), *_KERNEL_ARGS[w0.dtype])
    return _from_kernel(int(a.size), out)


def count_changes(w0: torch.Tensor, w1: torch.Tensor, mode: CompareMode = CompareMode()) -> ChangeCounts:
    """Changed-entry counts and ULP buckets for one chunk pair (any shapes with equal numel).

    With ``--as`` a narrower dtype, an entry that overflows it (finite as stored, ±inf once rounded) is counted in
    ``overflow_as``; if its stored values differ it is changed, with no ULP distance (``changed_nonfinite``).
    """
    numel = int(w0.numel())
    x0, x1 = w0.reshape(-1), w1.reshape(-1)
    if not (w0.dtype.is_floating_point and w1.dtype.is_floating_point):
        return ChangeCounts(numel=numel, changed=int(torch.count_nonzero(x0 != x1)))
    target = comparison_dtype(w0.dtype, w1.dtype, mode.as_dtype)
    a = x0 if x0.dtype == target else x0.to(target)  # rounded once, for the counts and the overflow test
    b = x1 if x1.dtype == target else x1.to(target)
    counts = _count_rounded(a, b, mode)
    if mode.as_dtype is None:
        return counts
    over = overflowed(x0, x1, a, b)
    if over is None or not bool(over.any()):
        return counts
    changed = bitwise_changed(a, b) if mode.kind == "bitwise" else tolerance_changed(a, b, mode.kind, mode.tol)
    hidden = overflow_hidden(x0, x1, a, b, changed)
    n_hidden = int(torch.count_nonzero(hidden)) if hidden is not None else 0
    extra = ChangeCounts(changed=n_hidden, changed_nonfinite=n_hidden, overflow_as=int(torch.count_nonzero(over)))
    return counts + extra


def _count_rounded(a: torch.Tensor, b: torch.Tensor, mode: CompareMode) -> ChangeCounts:
    """Counts of one flat chunk pair already in the comparison dtype."""
    numel = int(a.numel())
    cpu = a.device.type == "cpu"
    target = a.dtype
    kernels = _compiled_kernels() if cpu and target in _KERNEL_ARGS else None
    if kernels is not None:
        if mode.kind == "bitwise":
            return _bitwise_counts_compiled(kernels, a, b)
        return _tolerance_counts_compiled(kernels, a, b, mode.kind, mode.tol)
    if mode.kind == "bitwise" and cpu and target in _INF_BITS:
        return _bitwise_counts_numpy(a, b)
    mask = bitwise_changed(a, b) if mode.kind == "bitwise" else tolerance_changed(a, b, mode.kind, mode.tol)
    changed = int(torch.count_nonzero(mask))
    if not changed:
        return ChangeCounts(numel=numel)
    return ChangeCounts(numel=numel) + summarise_changed(a[mask], b[mask])
