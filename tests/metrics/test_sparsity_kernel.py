"""The compiled (numba) kernels against the numpy and torch paths and an independent pure-Python reference.

The reference decodes each value with ``struct`` and calls a pair changed when the decoded floats differ
or either is NaN (Python floats: +0 == -0). Its ULP distance is the difference of the two values' places
on the number line of representable values (magnitude, negated for a set sign bit), in Python integers,
which cannot wrap; a test checks that place against ``nextafter`` stepping. Adversarial pairs are checked
class by class (every pair the reference puts in one bucket must land in that bucket), so two
misclassifications cannot cancel in the totals. The rtol/atol kernel is checked the same way, its reference
applying the tolerance to the decoded Python (IEEE double) floats.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckptdiff.metrics import sparsity as sp
from ckptdiff.metrics.mask import CompareMode, update_mask
from ckptdiff.metrics.sparsity import ChangeCounts, count_changes, summarise_changed

pytest.importorskip("numba")

# dtype: (bits, mantissa bits)
LAYOUT: dict[torch.dtype, tuple[int, int]] = {
    torch.bfloat16: (16, 7),
    torch.float16: (16, 10),
    torch.float32: (32, 23),
    torch.float64: (64, 52),
}
DTYPES = list(LAYOUT)
BUCKETS = ("unchanged", "ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16", "changed_nonfinite")


def _kernels():  # type: ignore[no-untyped-def]
    k = sp._compiled_kernels()
    assert k is not None, "numba is importable but the kernels did not load"
    return k


def decode(bits: int, dtype: torch.dtype) -> float:
    """The value of one bit pattern, via struct (bf16 is the top half of an fp32)."""
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    fmt = {torch.float16: ("<H", "<e"), torch.float32: ("<I", "<f"), torch.float64: ("<Q", "<d")}[dtype]
    return struct.unpack(fmt[1], struct.pack(fmt[0], bits))[0]


def place(bits: int, dtype: torch.dtype) -> int:
    """Position on the line of representable values: +0 and -0 both 0, neighbours 1 apart."""
    nbits = LAYOUT[dtype][0]
    mag = bits & ((1 << (nbits - 1)) - 1)
    return -mag if bits >> (nbits - 1) else mag


def reference_bucket(x: int, y: int, dtype: torch.dtype) -> str:
    """The bucket of one pair of bit patterns, from decoded values and Python-integer distances."""
    vx, vy = decode(x, dtype), decode(y, dtype)
    if math.isnan(vx) or math.isnan(vy):
        return "changed_nonfinite"
    if vx == vy:
        return "unchanged"
    d = abs(place(x, dtype) - place(y, dtype))
    assert d >= 1
    return "ulp_1" if d == 1 else "ulp_2" if d == 2 else "ulp_3_4" if d <= 4 else "ulp_5_16" if d <= 16 else "ulp_gt16"


def reference_counts(xs: list[int], ys: list[int], dtype: torch.dtype) -> ChangeCounts:
    tally = dict.fromkeys(BUCKETS, 0)
    for x, y in zip(xs, ys, strict=True):
        tally[reference_bucket(x, y, dtype)] += 1
    n = len(xs)
    return ChangeCounts(n, n - tally.pop("unchanged"), **tally)


def all_in(bucket: str, n: int) -> ChangeCounts:
    """Counts of n entries that all fall in one bucket."""
    return ChangeCounts(n) if bucket == "unchanged" else ChangeCounts(n, n, **{bucket: n})


def as_tensor(bits: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    nbits = LAYOUT[dtype][0]
    arr = np.asarray(bits, dtype=np.uint64).astype(f"u{nbits // 8}").view(f"i{nbits // 8}")
    return torch.from_numpy(arr.copy()).view(dtype)


def both_paths(xs: list[int] | np.ndarray, ys: list[int] | np.ndarray, dtype: torch.dtype) -> tuple[ChangeCounts, ...]:
    a, b = as_tensor(xs, dtype), as_tensor(ys, dtype)
    return sp._bitwise_counts_compiled(_kernels(), a, b), sp._bitwise_counts_numpy(a, b)


def special_magnitudes(dtype: torch.dtype) -> list[int]:
    """Magnitudes at every edge: zero, subnormals, the normal boundary, 1.0, max finite, inf, NaN payloads."""
    nbits, mant = LAYOUT[dtype]
    inf = sp._INF_BITS[dtype]
    one = encode(1.0, dtype)
    quiet = inf | (1 << (mant - 1))
    all_ones = (1 << (nbits - 1)) - 1
    mags = [0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 18, 19]  # subnormals around each bucket edge
    mags += [(1 << mant) - 2, (1 << mant) - 1, 1 << mant, (1 << mant) + 1]  # subnormal/normal boundary
    mags += [one + k for k in (-17, -16, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 16, 17)]
    mags += [inf - k for k in (18, 17, 16, 5, 4, 3, 2, 1)] + [inf]  # max finite and neighbours, inf
    mags += [inf + 1, quiet - 1, quiet, quiet + 1, all_ones - 1, all_ones]  # signalling, quiet, all-ones NaNs
    return sorted(set(mags))


def adversarial_pairs(dtype: torch.dtype) -> tuple[list[int], list[int]]:
    """Every pair of special values of either sign, plus pairs at each bucket edge around zero and 1.0."""
    nbits, _ = LAYOUT[dtype]
    sign = 1 << (nbits - 1)
    values = [m | s for m in special_magnitudes(dtype) for s in (0, sign)]
    xs = [x for x in values for _ in values]
    ys = [y for _ in values for y in values]
    one = encode(1.0, dtype)
    for d in range(19):  # same sign, distance d; across zero, distance d split every way
        for base in (0, 1, 7, one, sp._INF_BITS[dtype] - 20):
            for s in (0, sign):
                xs += [base | s, (base + d) | s]
                ys += [(base + d) | s, base | s]
        for k in range(d + 1):
            xs += [k, k | sign]
            ys += [(d - k) | sign, d - k]
    return xs, ys


def encode(value: float, dtype: torch.dtype) -> int:
    """Bit pattern of a value exact in dtype (bf16: top half of the fp32 pattern)."""
    if dtype == torch.bfloat16:
        return struct.unpack("<I", struct.pack("<f", value))[0] >> 16
    fmt = {torch.float16: ("<e", "<H"), torch.float32: ("<f", "<I"), torch.float64: ("<d", "<Q")}[dtype]
    return struct.unpack(fmt[1], struct.pack(fmt[0], value))[0]


# -------------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_reference_place_matches_nextafter(dtype: torch.dtype) -> None:
    """k nextafter steps move the reference's place by exactly k: through zero, subnormals, up to inf."""
    npt = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
    uint = {torch.float16: np.uint16, torch.float32: np.uint32, torch.float64: np.uint64}[dtype]

    def bits(v: np.floating) -> int:
        return int(np.array(v).view(uint))

    tiny = npt(np.finfo(npt).smallest_subnormal)
    for start in (npt(0.0), npt(-0.0), npt(1.0), npt(-1.0), npt(np.finfo(npt).max), -3 * tiny, 2 * tiny):
        for target in (npt(np.inf), npt(-np.inf)):
            v = start
            for k in range(1, 18):
                if np.isinf(v):
                    break
                with np.errstate(over="ignore"):
                    v = np.nextafter(v, target)
                assert abs(place(bits(v), dtype) - place(bits(start), dtype)) == k, (start, target, k)


def test_hand_built_cases_against_literals() -> None:
    """A few pairs whose buckets are written out by hand, for each dtype: the reference and both paths."""
    for dtype in DTYPES:
        nbits, mant = LAYOUT[dtype]
        sign = 1 << (nbits - 1)
        inf = sp._INF_BITS[dtype]
        one = encode(1.0, dtype)
        cases = [
            (0, sign, "unchanged"),  # +0 vs -0
            (one, one, "unchanged"),
            (one, one + 1, "ulp_1"),  # 1.0 and the next value up
            (one, one - 1, "ulp_1"),  # 1.0 and the next value down
            (1, sign | 1, "ulp_2"),  # +-smallest subnormal: two steps through zero
            (0, sign | 1, "ulp_1"),  # +0 vs -smallest subnormal
            (one, one + 4, "ulp_3_4"),
            (one, one + 5, "ulp_5_16"),
            (one, one + 16, "ulp_5_16"),
            (one, one + 17, "ulp_gt16"),
            (one, sign | one, "ulp_gt16"),  # 1.0 vs -1.0
            (inf - 1, inf, "ulp_1"),  # max finite vs inf
            (inf, sign | inf, "ulp_gt16"),  # +inf vs -inf
            (inf | 1, inf | 1, "changed_nonfinite"),  # one NaN bit pattern on both sides
            (sign | (sign - 1), 0, "changed_nonfinite"),  # all-ones negative NaN vs +0
            (inf | (1 << (mant - 1)), one, "changed_nonfinite"),  # quiet NaN vs 1.0
        ]
        for x, y, bucket in cases:
            assert reference_bucket(x, y, dtype) == bucket, (dtype, hex(x), hex(y))
            expected = all_in(bucket, 1)
            compiled, numpy_path = both_paths([x], [y], dtype)
            assert compiled == numpy_path == expected, (dtype, hex(x), hex(y), bucket)


# -------------------------------------------------------------------------------------------------
# Adversarial pairs, class by class


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_pairs_class_by_class(dtype: torch.dtype) -> None:
    xs, ys = adversarial_pairs(dtype)
    groups: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for x, y in zip(xs, ys, strict=True):
        gx, gy = groups[reference_bucket(x, y, dtype)]
        gx.append(x)
        gy.append(y)
    assert set(groups) == set(BUCKETS), sorted(groups)  # every class is exercised
    for bucket, (gx, gy) in groups.items():
        expected = reference_counts(gx, gy, dtype)
        compiled, numpy_path = both_paths(gx, gy, dtype)
        assert compiled == expected, (dtype, bucket, compiled, expected)
        assert numpy_path == expected, (dtype, bucket, numpy_path, expected)
    compiled, numpy_path = both_paths(xs, ys, dtype)
    assert compiled == numpy_path == reference_counts(xs, ys, dtype)


def test_fp64_distances_past_int64() -> None:
    """fp64 pairs where int64 arithmetic would overflow (the sum of magnitudes across zero, or the difference
    of the raw patterns as signed integers) still count as > 16 ULPs apart."""
    sign = 1 << 63
    inf = sp._INF_BITS[torch.float64]
    big = encode(1e300, torch.float64)
    pairs = [(inf, sign | inf), (inf - 1, sign | (inf - 1)), (big, sign | big), (inf, sign | 1), (sign | 1, inf)]

    def signed(v: int) -> int:
        return v - (1 << 64) if v & sign else v

    for x, y in pairs:
        mag_sum = (x & (sign - 1)) + (y & (sign - 1))
        assert mag_sum >= 2**63 or not -(2**63) <= signed(x) - signed(y) < 2**63, (hex(x), hex(y))
        assert reference_bucket(x, y, torch.float64) == "ulp_gt16"
    compiled, numpy_path = both_paths([p[0] for p in pairs], [p[1] for p in pairs], torch.float64)
    assert compiled == numpy_path == ChangeCounts(5, 5, ulp_gt16=5)


# -------------------------------------------------------------------------------------------------
# Random bit patterns


def random_pairs(dtype: torch.dtype, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half uniform random bit patterns (NaNs and infs included); half ordinary values moved 0-20 ULPs."""
    nbits, _ = LAYOUT[dtype]
    u = np.dtype(f"u{nbits // 8}")
    rng = np.random.default_rng(seed)
    n = 2 * (1 << 18) + 1234  # several numpy pieces and kernel blocks, with ragged ends
    h = n // 2
    xs = rng.integers(0, 1 << nbits, n, dtype=np.uint64).astype(u)
    ys = rng.integers(0, 1 << nbits, n, dtype=np.uint64).astype(u)
    near = torch.randn(n - h, generator=torch.Generator().manual_seed(seed)).to(dtype)
    xs[h:] = near.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[nbits]).numpy().view(u)
    ys[h:] = xs[h:] + rng.integers(0, 21, n - h).astype(u)  # magnitude up, either sign; |randn| is far from inf
    flip = rng.random(n) < 0.02
    ys[flip] ^= u.type(1 << (nbits - 1))  # some sign flips (some between +0 and -0)
    return xs, ys


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_bit_patterns(dtype: torch.dtype) -> None:
    xs, ys = random_pairs(dtype, seed=11)
    compiled, numpy_path = both_paths(xs, ys, dtype)
    assert compiled == numpy_path
    a, b = as_tensor(xs, dtype), as_tensor(ys, dtype)
    mask = update_mask(a, b)
    assert compiled == ChangeCounts(numel=a.numel()) + summarise_changed(a[mask], b[mask])
    # The pure-Python reference on a slice from each half.
    for s in (0, len(xs) // 2):
        sx, sy = [int(v) for v in xs[s : s + 20_000]], [int(v) for v in ys[s : s + 20_000]]
        assert both_paths(sx, sy, dtype)[0] == reference_counts(sx, sy, dtype)


# -------------------------------------------------------------------------------------------------
# Dispatch


def test_count_changes_uses_the_kernel_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_compiled, real_numpy = sp._bitwise_counts_compiled, sp._bitwise_counts_numpy
    monkeypatch.setattr(sp, "_bitwise_counts_compiled", lambda *a: calls.append("numba") or real_compiled(*a))
    monkeypatch.setattr(sp, "_bitwise_counts_numpy", lambda *a: calls.append("numpy") or real_numpy(*a))
    w0 = torch.randn(1000).to(torch.bfloat16)
    w1 = w0.clone()
    w1[::3] = -w1[::3]
    monkeypatch.delenv(sp._NO_NUMBA_ENV, raising=False)
    fast = count_changes(w0, w1)
    monkeypatch.setenv(sp._NO_NUMBA_ENV, "1")
    slow = count_changes(w0, w1)
    monkeypatch.setenv(sp._NO_NUMBA_ENV, "0")
    again = count_changes(w0, w1)
    assert calls == ["numba", "numpy", "numba"]
    assert fast == slow == again
    # fp8 has no compiled kernel: the numpy path.
    calls.clear()
    count_changes(w0.to(torch.float8_e4m3fn), w1.to(torch.float8_e4m3fn))
    assert calls == ["numpy"]


def test_missing_numba_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "_kernel_module", [None])  # as if the import had failed
    w0 = torch.randn(5000).to(torch.float16)
    w1 = w0 * 1.001
    assert count_changes(w0, w1) == sp._bitwise_counts_numpy(w0, w1)


def test_strided_and_shaped_inputs() -> None:
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(300, 200, generator=g).to(torch.bfloat16)
    w1 = (w0.float() * (1 + 0.01 * torch.randn(300, 200, generator=g))).to(torch.bfloat16)
    for x, y in ((w0, w1), (w0.t(), w1.t()), (w0[:, ::3], w1[:, ::3])):
        mask = update_mask(x, y).reshape(-1)
        expected = ChangeCounts(numel=x.numel()) + summarise_changed(x.reshape(-1)[mask], y.reshape(-1)[mask])
        assert count_changes(x, y) == expected


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n", [1 << 10, 1 << 21])
def test_bitwise_path_makes_no_torch_compute_calls(n: int) -> None:
    """Only views (no kernels that could wake OpenMP threads), and as many for 2M entries as for 1K."""
    w0 = torch.randn(n).to(torch.bfloat16)
    w1 = w0.clone()
    w1[::7] = w1[::7] * 2
    with _OpLog() as log:
        count_changes(w0, w1)
    assert set(log.ops) <= {"aten.view.default", "aten.view.dtype", "aten.detach.default"}, log.ops
    assert len(log.ops) <= 10


def test_as_mode_takes_the_kernel_after_rounding() -> None:
    """--as rounds both sides in torch, then counts like a bitwise comparison of the rounded tensors."""
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(50_000, generator=g)
    w1 = w0 + 1e-3 * torch.randn(50_000, generator=g)
    a, b = w0.to(torch.bfloat16), w1.to(torch.bfloat16)
    mask = update_mask(a, b)
    expected = ChangeCounts(numel=50_000) + summarise_changed(a[mask], b[mask])
    assert count_changes(w0, w1, CompareMode(as_dtype=torch.bfloat16)) == expected == count_changes(a, b)


def test_kernels_compile_where_numba_cannot_cache() -> None:
    """With nowhere to write a cache (here: no source file; likewise a read-only install and home), numba
    refuses cache=True; the kernels are then compiled uncached, without a warning."""
    from ckptdiff.metrics import _kernels

    ns: dict[str, object] = {}
    exec(compile("def f(x):\n    return x + 1\n", "<no file>", "exec"), ns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jitted = _kernels._jit(ns["f"])  # type: ignore[arg-type]
        assert jitted(1) == 2


# -------------------------------------------------------------------------------------------------
# Tolerance modes (rtol / atol): the compiled kernel against the torch mask path and a Python reference

TOLERANCES = [("rtol", 0.0), ("rtol", 2**-9), ("rtol", 1e-3), ("rtol", 0.5), ("rtol", 2.0)]
TOLERANCES += [("atol", 0.0), ("atol", 1e-30), ("atol", 1e-3), ("atol", 1.0), ("atol", math.inf)]


def reference_tolerance_bucket(x: int, y: int, dtype: torch.dtype, kind: str, tol: float) -> str:
    """As reference_bucket, with "unchanged" decided by the tolerance on Python (IEEE double) floats."""
    vx, vy = decode(x, dtype), decode(y, dtype)
    if math.isnan(vx) or math.isnan(vy):
        return "changed_nonfinite"
    bound = tol * max(abs(vx), abs(vy)) if kind == "rtol" else tol  # 0 * inf is NaN: nothing is within it
    if abs(vy - vx) <= bound or vx == vy:
        return "unchanged"
    return reference_bucket(x, y, dtype)


def torch_path(a: torch.Tensor, b: torch.Tensor, mode: CompareMode) -> ChangeCounts:
    mask = update_mask(a, b, mode)
    return ChangeCounts(numel=a.numel()) + summarise_changed(a[mask], b[mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_adversarial_pairs_class_by_class(dtype: torch.dtype) -> None:
    xs, ys = adversarial_pairs(dtype)
    seen: set[str] = set()
    for kind, tol in TOLERANCES:
        mode = CompareMode(kind, tol)  # type: ignore[arg-type]
        groups: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for x, y in zip(xs, ys, strict=True):
            gx, gy = groups[reference_tolerance_bucket(x, y, dtype, kind, tol)]
            gx.append(x)
            gy.append(y)
        seen |= set(groups)
        for bucket, (gx, gy) in groups.items():
            expected = all_in(bucket, len(gx))
            a, b = as_tensor(gx, dtype), as_tensor(gy, dtype)
            got = sp._tolerance_counts_compiled(_kernels(), a, b, kind, tol)
            assert got == expected, (dtype, kind, tol, bucket, got)
            assert torch_path(a, b, mode) == expected, (dtype, kind, tol, bucket)
    assert seen == set(BUCKETS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_random_bit_patterns(dtype: torch.dtype) -> None:
    xs, ys = random_pairs(dtype, seed=12)
    a, b = as_tensor(xs, dtype), as_tensor(ys, dtype)
    for kind, tol in (("rtol", 1e-3), ("rtol", 2**-9), ("atol", 1e-4)):
        got = sp._tolerance_counts_compiled(_kernels(), a, b, kind, tol)
        assert got == torch_path(a, b, CompareMode(kind, tol)), (kind, tol)  # type: ignore[arg-type]


def test_tolerance_through_count_changes() -> None:
    """count_changes takes the kernel for rtol/atol (mixed dtypes rounded first), and the switch restores torch."""
    g = torch.Generator().manual_seed(8)
    w0 = torch.randn(70_000, generator=g)
    w1 = (w0 * (1 + 1e-3 * torch.randn(70_000, generator=g))).to(torch.bfloat16)
    for mode in (CompareMode("rtol", 1e-3), CompareMode("atol", 1e-4), CompareMode("rtol", 1e-6, torch.float16)):
        a, b = (w0.to(torch.bfloat16), w1) if mode.as_dtype is None else (w0.half(), w1.half())
        with _OpLog() as log:
            got = count_changes(w0, w1, mode)
        assert got == torch_path(a, b, mode), mode
        compute = [op for op in log.ops if op not in {"aten.view.default", "aten.view.dtype", "aten.detach.default"}]
        if mode.as_dtype is None:  # rounding only
            assert compute == ["aten._to_copy.default"] * compute.count("aten._to_copy.default"), compute
        else:  # plus the --as overflow check: a few element-wise passes per chunk, never per piece
            assert len(compute) < 40, compute


def test_switch_sends_tolerances_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    w0 = torch.randn(4000).to(torch.float16)
    w1 = (w0.float() * 1.0005).to(torch.float16)
    mode = CompareMode("rtol", 1e-3)
    compiled = count_changes(w0, w1, mode)
    monkeypatch.setenv(sp._NO_NUMBA_ENV, "1")
    with _OpLog() as log:
        assert count_changes(w0, w1, mode) == compiled
    assert "aten.abs.default" in log.ops  # tolerance_changed in torch


@pytest.mark.parametrize("extra", [None, float("nan"), float("-inf"), float("inf")])
def test_as_overflow_is_counted_whatever_else_the_chunk_holds(
    extra: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--as fp16: 70000 and 80000 both round to +inf (fp16 tops out at 65504), so that entry overflowed and its change
    is kept. The shortcut that skips the overflow masks when no rounded entry is infinite must not skip it when the
    chunk also holds a NaN (its min and max are then NaN) or a stored infinity (not an overflow)."""
    from ckptdiff.metrics import mask

    w0 = torch.tensor([70000.0, 1.0, 2.0, 3.0])
    w1 = torch.tensor([80000.0, 1.0, 2.0, 3.0])
    if extra is not None:
        w0[3] = w1[3] = extra
    mode = CompareMode(as_dtype=torch.float16)
    got = count_changes(w0, w1, mode)
    assert got.overflow_as == 1  # only entry 0 was finite as stored and infinite once rounded
    assert got.changed_nonfinite >= 1  # its change is counted, with no ULP distance
    monkeypatch.setattr(mask, "_surely_finite", lambda t: False)  # the full masks, always
    assert count_changes(w0, w1, mode) == got
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert mask.overflowed(finite, finite, finite.half(), finite.half()) is not None  # full masks, as patched
    monkeypatch.undo()
    assert mask.overflowed(finite, finite, finite.half(), finite.half()) is None  # nothing rounded to inf: skipped
