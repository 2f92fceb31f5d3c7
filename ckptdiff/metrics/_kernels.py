"""Compiled sparsity kernels (numba): one pass over the raw bit patterns of a chunk pair.

Imported lazily by :mod:`ckptdiff.metrics.sparsity`, and only when numba is importable, so that neither
the CLI's start-up nor an install without numba pays for it. The kernels release the GIL, so the
prefetching reader thread keeps reading while a chunk is counted.

Every array argument is a 1-D, C-contiguous array of one unsigned integer dtype of 16, 32 or 64 bits (the float's bit
patterns); every scalar argument has that same dtype. numba widens arithmetic on narrow integers to 64
bits, so each intermediate is cast back to that dtype: that keeps 16 lanes per AVX2 vector for bf16 and
fp16 instead of 4. Counts are sums of comparisons, which LLVM vectorizes, accumulated per block in the
bit patterns' own dtype (at most ``_BLOCK`` entries, so they cannot overflow) and in int64 across blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

# Entries per block of narrow counters: below 2**16, so 16-bit counters cannot overflow. A compile-time
# constant on purpose: with a block size passed in at run time, LLVM vectorized the loop 3x slower.
_BLOCK = 1 << 15


def _jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``njit(nogil=True, cache=True)``, without the on-disk cache where numba finds nowhere to write one.

    numba caches next to this file (``__pycache__``), else in the user's cache directory; with neither
    writable (a read-only install and no writable home), it refuses ``cache=True`` outright, and the
    kernel is then compiled afresh in each process instead.
    """
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


@_jit
def bitwise_counts(a, b, mag_mask, inf, big):
    """Bitwise-test counts of one pair of bit-pattern arrays: (c0, c1, c2, c4, c16, nan).

    Per entry, d is the ULP distance: |mag_a - mag_b| for equal signs, mag_a + mag_b across zero (which
    fits the dtype: each magnitude is below half its range); +0 against -0 gives 0. An entry with a NaN
    on either side gets d = ``big`` and counts in ``nan``. Returned: how many entries have d == 0
    (unchanged), d <= 1, d <= 2, d <= 4, d <= 16, and how many involve a NaN. ``mag_mask`` is every bit
    but the sign, ``inf`` the magnitude of inf (larger is NaN), ``big`` all ones.
    """
    t = type(mag_mask)  # the bit patterns' own unsigned dtype
    zero = t(0)
    one = t(1)
    two = t(2)
    four = t(4)
    sixteen = t(16)
    sign = t(mag_mask + one)  # only the sign bit set
    n = a.size
    c0 = c1 = c2 = c4 = c16 = nan = np.int64(0)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        k0 = k1 = k2 = k4 = k16 = kn = zero
        for i in range(start, stop):
            x = a[i]
            y = b[i]
            mx = t(x & mag_mask)
            my = t(y & mag_mask)
            hi = max(mx, my)
            lo = min(mx, my)
            is_nan = hi > inf
            d = t(mx + my) if t(x ^ y) >= sign else t(hi - lo)
            d = big if is_nan else d
            kn = t(kn + is_nan)
            k0 = t(k0 + (d == zero))
            k1 = t(k1 + (d <= one))
            k2 = t(k2 + (d <= two))
            k4 = t(k4 + (d <= four))
            k16 = t(k16 + (d <= sixteen))
        c0 += np.int64(k0)
        c1 += np.int64(k1)
        c2 += np.int64(k2)
        c4 += np.int64(k4)
        c16 += np.int64(k16)
        nan += np.int64(kn)
    return c0, c1, c2, c4, c16, nan


@_jit
def tolerance_counts(a, b, v0, v1, relative, tol, mag_mask, inf, big):
    """Tolerance-test counts, in the same form as :func:`bitwise_counts`; the ULP distance as there.

    ``v0`` and ``v1`` are the values of the bit patterns ``a`` and ``b`` (float32 or float64), compared in
    float64 exactly as :func:`ckptdiff.metrics.mask.tolerance_changed` does: unchanged where
    |v1 - v0| <= tol * max(|v0|, |v1|) (``relative``) or <= tol, or where v0 == v1; changed wherever either
    is NaN. An unchanged entry gets d = 0; a changed one is at least 1 ULP away, or involves a NaN.
    """
    t = type(mag_mask)
    one = t(1)
    sign = t(mag_mask + one)
    n = a.size
    c0 = c1 = c2 = c4 = c16 = nan = np.int64(0)
    for i in range(n):
        x = a[i]
        y = b[i]
        mx = t(x & mag_mask)
        my = t(y & mag_mask)
        hi = max(mx, my)
        lo = min(mx, my)
        is_nan = hi > inf
        d = t(mx + my) if t(x ^ y) >= sign else t(hi - lo)
        p = np.float64(v0[i])
        q = np.float64(v1[i])
        diff = abs(q - p)  # NaN for inf - inf, and for NaN inputs
        bound = tol * max(abs(p), abs(q)) if relative else tol  # NaN inputs are changed whatever this is
        changed = not (diff <= bound or p == q) or is_nan
        d = big if is_nan else (d if changed else t(0))
        nan += is_nan
        c0 += d == 0
        c1 += d <= 1
        c2 += d <= 2
        c4 += d <= 4
        c16 += d <= 16
    return c0, c1, c2, c4, c16, nan
