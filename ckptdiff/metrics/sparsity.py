"""Update sparsity counts (METRICS.md §1) for one flat chunk of a tensor pair, as a pure function.

The counts add up across chunks, so a tensor of any size is measured in bounded memory.
The bitwise CPU path works on integer views in cache-sized pieces with numpy, which runs near memory
speed; every other case (GPU, tolerances, mixed dtypes) goes through :func:`update_mask` in torch.
Both paths define "changed" identically; a test checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ckptdiff.metrics.mask import CompareMode, bitwise_changed, comparison_dtype, tolerance_changed

# ULP-distance buckets for changed entries: 1, 2, 3-4, 5-16, more than 16 representable steps apart.
ULP_EDGES = (1, 2, 4, 16)
ULP_LABELS = ("ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16")
_PIECE = 1 << 20  # entries per numpy piece: two int16 pieces plus a bool mask stay in L2


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


def _bitwise_counts_numpy(w0: torch.Tensor, w1: torch.Tensor) -> ChangeCounts:
    """Bitwise counts on the CPU with numpy integer views, in cache-sized pieces."""
    udt = np.dtype(f"u{w0.element_size()}")
    sdt = _SIGNED[w0.element_size()]
    a = w0.reshape(-1).view(sdt).numpy().view(udt)  # (n,) raw bits
    b = w1.reshape(-1).view(sdt).numpy().view(udt)
    nbits = udt.itemsize * 8
    mag_mask = udt.type((1 << (nbits - 1)) - 1)
    inf = _INF_BITS[w0.dtype]
    total = ChangeCounts(numel=int(a.size))
    neq = np.empty(min(_PIECE, a.size), dtype=bool)
    for s in range(0, a.size, _PIECE):
        x, y = a[s : s + _PIECE], b[s : s + _PIECE]
        m = neq[: x.size]
        np.not_equal(x, y, out=m)
        n = int(np.count_nonzero(m))
        if n:
            cx, cy = x[m], y[m]
            zero_pair = ((cx | cy) & mag_mask) == 0  # +0 vs -0: equal
            if zero_pair.any():
                cx, cy = cx[~zero_pair], cy[~zero_pair]
            ca = torch.from_numpy(cx.view(f"i{udt.itemsize}")).view(w0.dtype)  # (n_changed,)
            cb = torch.from_numpy(cy.view(f"i{udt.itemsize}")).view(w0.dtype)
            total = total + summarise_changed(ca, cb)
        # Bit-identical NaNs still count as changed. NaN needs magnitude bits above inf's, which the
        # maximum of the magnitudes reveals in one cheap reduction.
        if int((x & mag_mask).max(initial=0)) > inf:
            nan_same = ((x & mag_mask) > inf) & ~m
            k = int(np.count_nonzero(nan_same))
            if k:
                total = total + ChangeCounts(changed=k, changed_nonfinite=k)
    return total


def count_changes(w0: torch.Tensor, w1: torch.Tensor, mode: CompareMode = CompareMode()) -> ChangeCounts:
    """Changed-entry counts and ULP buckets for one chunk pair (any shapes with equal numel)."""
    numel = int(w0.numel())
    if not (w0.dtype.is_floating_point and w1.dtype.is_floating_point):
        return ChangeCounts(numel=numel, changed=int(torch.count_nonzero(w0.reshape(-1) != w1.reshape(-1))))
    target = comparison_dtype(w0.dtype, w1.dtype, mode.as_dtype)
    a = w0.reshape(-1) if w0.dtype == target else w0.reshape(-1).to(target)
    b = w1.reshape(-1) if w1.dtype == target else w1.reshape(-1).to(target)
    if mode.kind == "bitwise" and a.device.type == "cpu" and target in _INF_BITS:
        return _bitwise_counts_numpy(a, b)
    mask = bitwise_changed(a, b) if mode.kind == "bitwise" else tolerance_changed(a, b, mode.kind, mode.tol)
    changed = int(torch.count_nonzero(mask))
    if not changed:
        return ChangeCounts(numel=numel)
    return ChangeCounts(numel=numel) + summarise_changed(a[mask], b[mask])
