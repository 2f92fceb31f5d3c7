"""Exactness of the fast magnitude-bin and principal-mask paths (docs/metrics.md §2, §2b).

The integer-only exponent bins, the one-pass joint bin counts, the 16-bit selection keys and the in-place update
arithmetic must give exactly what the straightforward versions gave. The references below are the previous
implementations, kept verbatim, run on adversarial values: every bit pattern of the 16-bit floats (±0, every
subnormal, ±inf, every NaN payload) and random bit patterns plus specials for fp32/fp64.
"""

from __future__ import annotations

import math

import pytest
import torch

from ckptdiff.dtypes import INT_VIEW
from ckptdiff.metrics import linalg
from ckptdiff.metrics import mask as M
from ckptdiff.metrics import principal as P

FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# the previous implementations (references)


def ref_exponent_bins(w0: torch.Tensor) -> torch.Tensor:
    if w0.dtype not in M._LAYOUT:
        w0 = w0.to(torch.float32)
    mant_bits, exp_mask, bias = M._LAYOUT[w0.dtype]
    bits = w0.reshape(w0.shape).view(INT_VIEW[w0.element_size()])
    bits = bits.to(torch.int64) if w0.element_size() == 8 else bits.to(torch.int32)
    field = (bits >> mant_bits) & exp_mask
    mantissa = bits & ((1 << mant_bits) - 1)
    bins = field - bias
    bins = torch.where(field == 0, torch.where(mantissa == 0, M.ZERO_BIN, -bias), bins)
    return torch.where(field == exp_mask, M.NONFINITE_BIN, bins).to(torch.int16)


def ref_bin_counts(bins: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    flat = bins.reshape(-1)
    flat_masks = [m.reshape(-1) for m in masks]
    n_b = torch.zeros(M._BIN_SLOTS, dtype=torch.int64)
    counts = [torch.zeros(M._BIN_SLOTS, dtype=torch.int64) for _ in masks]
    dense = flat.to(torch.int64) + M._BIN_OFFSET
    n_b += torch.bincount(dense, minlength=M._BIN_SLOTS)
    for acc, m in zip(counts, flat_masks, strict=True):
        acc += torch.bincount(dense[m], minlength=M._BIN_SLOTS)
    return n_b.to(torch.float64), [c.to(torch.float64) for c in counts]


def ref_matched_overlap(bins: torch.Tensor, update: torch.Tensor, region: torch.Tensor) -> float:
    n_b, (u_b, c_b) = ref_bin_counts(bins, update, region)
    total = float(u_b.sum())
    if total == 0:
        return float("nan")
    return float((u_b * c_b / n_b.clamp_min(1)).sum()) / total


# ---------------------------------------------------------------------------------------------
# adversarial values


def adversarial(dtype: torch.dtype, seed: int = 0, n_random: int = 40_000) -> torch.Tensor:
    """Flat tensor: every bit pattern of a 16-bit float, or specials plus random bit patterns for fp32/fp64,
    with extra zeros and subnormals mixed in, shuffled."""
    g = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    iview = INT_VIEW[size]
    if size == 2:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    else:
        lo, hi = (-(1 << 31), 1 << 31) if size == 4 else (-(1 << 63), (1 << 63) - 1)
        rand = torch.randint(lo, hi, (n_random,), generator=g, dtype=torch.int64).to(iview).view(dtype)
        mant_bits, exp_mask, _ = M._LAYOUT[dtype]
        patterns = [1, (1 << mant_bits) - 1, 1 << mant_bits, exp_mask << mant_bits, (exp_mask << mant_bits) | 1]
        pats = torch.tensor(patterns, dtype=torch.int64).to(iview).view(dtype)
        fi = torch.finfo(dtype)
        vals = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, fi.tiny, -fi.tiny, fi.max, -fi.max, math.inf, -math.inf, math.nan]
        x = torch.cat([rand, pats, -pats, torch.tensor(vals, dtype=dtype)])
    fi = torch.finfo(dtype)
    sub = torch.tensor([fi.tiny / 2, -fi.tiny / 4, fi.tiny / 8], dtype=torch.float64).to(dtype)
    extra = torch.cat([torch.zeros(500, dtype=dtype), -torch.zeros(300, dtype=dtype), sub.repeat(100)])
    x = torch.cat([x, extra])
    return x[torch.randperm(x.numel(), generator=g)]


def masks_for(n: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) < p for p in (0.2, 0.5, 0.7)[:count]]


# ---------------------------------------------------------------------------------------------
# exponent bins, bin counts


@pytest.mark.parametrize("dtype", FLOATS)
def test_exponent_bins_equal_the_reference_on_adversarial_values(dtype: torch.dtype) -> None:
    x = adversarial(dtype)
    assert torch.equal(M.exponent_bins(x), ref_exponent_bins(x))
    grid = x[: 120 * 90].reshape(120, 90)
    got = M.exponent_bins(grid.mT)  # non-contiguous input keeps its shape
    assert got.shape == (90, 120) and torch.equal(got, ref_exponent_bins(grid.mT))
    assert M.exponent_bins(x).dtype == torch.int16


def test_exponent_bins_of_non_float_dtypes_go_through_fp32() -> None:
    x = torch.tensor([0, 1, -3, 1000, 2**20], dtype=torch.int32)
    assert torch.equal(M.exponent_bins(x), ref_exponent_bins(x))
    e = torch.tensor([0.0, 0.25, -448.0], dtype=torch.float8_e4m3fn)
    assert torch.equal(M.exponent_bins(e), ref_exponent_bins(e))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nmasks", [0, 1, 3])
def test_bin_counts_equal_the_reference(dtype: torch.dtype, nmasks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = adversarial(dtype, seed=1)
    bins = M.exponent_bins(x)
    masks = masks_for(x.numel(), nmasks, seed=2)
    expected = ref_bin_counts(bins, *masks)
    for piece in (M._COUNT_PIECE, 7919):  # one piece, and many pieces with a ragged end
        monkeypatch.setattr(M, "_COUNT_PIECE", piece)
        n_b, counts = M.bin_counts(bins, *masks)
        assert torch.equal(n_b, expected[0])
        assert all(torch.equal(a, b) for a, b in zip(counts, expected[1], strict=True))


def brute_joint(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    slots = ref_exponent_bins(x).reshape(-1).to(torch.int64) + M._BIN_OFFSET
    code = torch.zeros_like(slots)
    for i, m in enumerate(masks):
        code += m.reshape(-1).to(torch.int64) << i
    out = torch.zeros(1 << len(masks), M._BIN_SLOTS, dtype=torch.int64)
    out.index_put_((code, slots), torch.ones_like(slots), accumulate=True)
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nmasks", [0, 1, 2, 3])
def test_joint_bin_counts_match_brute_force(dtype: torch.dtype, nmasks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = adversarial(dtype, seed=3)
    masks = masks_for(x.numel(), nmasks, seed=4)
    expected = brute_joint(x, masks)
    for piece in (M._COUNT_PIECE, 4099):  # many pieces: some with zeros/subnormals, some without
        monkeypatch.setattr(M, "_COUNT_PIECE", piece)
        assert torch.equal(M.joint_bin_counts(x, *masks), expected)
        assert torch.equal(M.joint_bin_counts(x, *masks, bins=M.exponent_bins(x)), expected)
    grid = x[: 200 * 150].reshape(200, 150)  # a 2-D matrix and 2-D masks
    grid_masks = [m[: 200 * 150].reshape(200, 150) for m in masks]
    assert torch.equal(M.joint_bin_counts(grid, *grid_masks), brute_joint(grid, grid_masks))


def test_joint_bin_counts_without_zeros_and_limits() -> None:
    x = torch.linspace(0.5, 3.0, 1000).to(torch.bfloat16)  # no field-0 entries: the split is skipped
    m = torch.arange(1000) % 3 == 0
    assert torch.equal(M.joint_bin_counts(x, m), brute_joint(x, [m]))
    with pytest.raises(ValueError):
        M.joint_bin_counts(x, m, m, m, m)


@pytest.mark.parametrize("dtype", FLOATS)
def test_magnitude_matched_overlap_equals_the_reference(dtype: torch.dtype) -> None:
    x = adversarial(dtype, seed=5)
    bins = M.exponent_bins(x)
    u, c = masks_for(x.numel(), 2, seed=6)
    assert M.magnitude_matched_overlap(bins, u, c) == ref_matched_overlap(bins, u, c)
    assert math.isnan(M.magnitude_matched_overlap(bins, torch.zeros_like(u), c))


# ---------------------------------------------------------------------------------------------
# principal metrics: counts and baselines against the reference formulas


def finite_matrix(dtype: torch.dtype, m: int, n: int, seed: int) -> torch.Tensor:
    """A matrix with a decaying spectrum plus zeros, ±0 and subnormals."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, 8, generator=g, dtype=torch.float64) @ torch.randn(8, n, generator=g, dtype=torch.float64)
    w = (w + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)
    flat = w.reshape(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    fi = torch.finfo(dtype)
    flat[idx[:40]] = 0.0
    flat[idx[40:60]] = -0.0
    flat[idx[60:80]] = torch.tensor(fi.tiny / 4, dtype=torch.float64).to(dtype)
    return w


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("given_bins", [False, True])
def test_principal_counts_and_magnitude_baselines_equal_the_reference(dtype: torch.dtype, given_bins: bool) -> None:
    m, n = 48, 40
    w0 = finite_matrix(dtype, m, n, seed=7)
    g = torch.Generator().manual_seed(8)
    update = torch.rand(m, n, generator=g) < 0.3
    w1 = torch.where(update, w0.to(torch.float64) * 1.01, w0.to(torch.float64)).to(dtype)
    top = linalg.exact_topk(w0, 4, dtype=torch.float64)
    bins = M.exponent_bins(w0) if given_bins else None
    r, masks = P.principal_metrics_with_masks(w0, update, top.u[0], top.s[0], top.v[0], 0.5, w1=w1, bins=bins)
    ref_bins = ref_exponent_bins(w0)
    regions = (masks.principal, masks.low, masks.principal_not_low)
    assert torch.equal(masks.principal_not_low, masks.principal & ~masks.low)
    assert r.changed == int(update.sum())
    assert [r.principal_size, r.low_size, r.principal_not_low_size] == [int(x.sum()) for x in regions]
    hits = [r.changed_principal, r.changed_low, r.changed_principal_not_low]
    assert hits == [int((x & update).sum()) for x in regions]
    got = (r.baseline_principal_magnitude, r.baseline_low_magnitude, r.baseline_principal_not_low_magnitude)
    assert list(got) == [ref_matched_overlap(ref_bins, update, x) for x in regions]  # bit for bit


def test_principal_baselines_with_non_finite_entries_in_w0() -> None:
    w0 = finite_matrix(torch.bfloat16, 32, 24, seed=9)
    w0[0, 0], w0[1, 1], w0[2, 2] = math.inf, -math.inf, math.nan
    top = linalg.exact_topk(w0.nan_to_num(0.0, 0.0, 0.0), 3, dtype=torch.float64)
    update = torch.rand(32, 24, generator=torch.Generator().manual_seed(10)) < 0.5
    r, masks = P.principal_metrics_with_masks(w0, update, top.u[0], top.s[0], top.v[0], 0.4, delta=torch.ones(32, 24))
    ref_bins = ref_exponent_bins(w0)
    assert r.baseline_low_magnitude == ref_matched_overlap(ref_bins, update, masks.low)
    assert r.baseline_principal_magnitude == ref_matched_overlap(ref_bins, update, masks.principal)
    assert not masks.low[2, 2]  # NaN ranks above +inf: never among the smallest


# ---------------------------------------------------------------------------------------------
# selection keys, radix select, in-place arithmetic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_select_mask_16_bit_keys_with_specials(dtype: torch.dtype, largest: bool) -> None:
    g = torch.Generator().manual_seed(11)
    x = (torch.randint(-6, 7, (13, 11), generator=g) * 0.25).to(dtype)  # heavy ties
    flat = x.reshape(-1)
    flat[:6] = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, torch.finfo(dtype).tiny / 4], dtype=dtype)
    values = flat.double().abs().tolist()
    key = [(math.isnan(v), 0.0 if math.isnan(v) else v) for v in values]  # NaN above +inf
    for count in range(len(key) + 1):  # every count: every tie split
        if largest:
            order = sorted(range(len(key)), key=lambda i: (not key[i][0], -key[i][1], i))
        else:
            order = sorted(range(len(key)), key=lambda i: (key[i][0], key[i][1], i))
        expected = torch.zeros(len(key), dtype=torch.bool)
        expected[order[:count]] = True
        got = P.select_mask(x, count, largest=largest)
        assert torch.equal(got.reshape(-1), expected), count
        assert int(got.sum()) == count
        widened = P.select_mask(x.float(), count, largest=largest)  # the old key width gives the same mask
        assert torch.equal(got, widened), count


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_radix_select_counts_below_and_equal(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(12)
    nbits = torch.iinfo(dtype).bits
    hi = min(1 << (nbits - 1), 1 << 40)
    for spread in (5, 1000, hi):
        keys = torch.randint(0, spread, (5000,), generator=g, dtype=torch.int64).to(dtype)
        ordered = torch.sort(keys).values
        for rank in (0, 1, 2500, 4999):
            value, below, equal = P._radix_select(keys, rank, nbits)
            assert value == int(ordered[rank])
            assert below == int((keys < value).sum()) and equal == int((keys == value).sum())
            assert P.kth_smallest_key(keys, rank, nbits) == value


PAIRS = [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float64),
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float32),  # W0 wider than the computation: rounded first, as before
]


@pytest.mark.parametrize(("dt1", "dt0", "dt"), PAIRS)
def test_difference_is_bitwise_the_plain_subtraction(dt1: torch.dtype, dt0: torch.dtype, dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(13)
    w0 = (torch.randn(37, 23, generator=g, dtype=torch.float64) * 3).to(dt0)
    w1 = (torch.randn(37, 23, generator=g, dtype=torch.float64) * 3).to(dt1)
    w0[0, :3] = torch.tensor([math.inf, 0.0, -0.0], dtype=torch.float64).to(dt0)
    w1[0, :3] = torch.tensor([math.inf, -0.0, 1e-30], dtype=torch.float64).to(dt1)
    expected = w1.to(dt) - w0.to(dt)
    got = P.difference(w1, w0, dt)
    assert got.dtype == dt and torch.equal(torch.isnan(got), torch.isnan(expected))
    iv = INT_VIEW[got.element_size()]
    ok = ~torch.isnan(got)
    assert torch.equal(got.view(iv)[ok], expected.view(iv)[ok])
    same = w1.to(dt)
    assert P.difference(same, w0, dt) is not same  # never the caller's tensor


def test_energy_in_place_and_delta_left_alone() -> None:
    w0 = finite_matrix(torch.float32, 40, 30, seed=14)
    top = linalg.exact_topk(w0, 4, dtype=torch.float64)
    u, s, v = top.u[0], top.s[0], top.v[0]
    delta = torch.randn(40, 30, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    keep = delta.clone()
    assert P.update_energy(delta.clone(), u, v, overwrite=True) == P.update_energy(delta, u, v)
    r = P.principal_metrics(w0, torch.ones(40, 30, dtype=torch.bool), u, s, v, delta=delta)
    assert torch.equal(delta, keep)  # a caller's delta is never used as scratch
    w1 = w0 + 0.01
    a = P.principal_metrics(w0, w1 != w0, u, s, v, w1=w1)
    b = P.principal_metrics(w0, w1 != w0, u, s, v, delta=w1.double() - w0.double())
    assert a == b and r.delta_fro_sq == pytest.approx(float(delta.square().sum()), rel=1e-12)


def test_rank_k_magnitude_into_a_buffer() -> None:
    top = linalg.exact_topk(finite_matrix(torch.float32, 30, 20, seed=16), 3, dtype=torch.float64)
    u, s, v = top.u[0], top.s[0], top.v[0]
    buf = torch.full((30, 20), math.nan, dtype=torch.float64)
    out = P.rank_k_magnitude(u, s, v, out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, P.rank_k_magnitude(u, s, v))


# ---------------------------------------------------------------------------------------------
# finiteness per matrix


@pytest.mark.parametrize("dtype", FLOATS)
def test_finite_rows_matches_isfinite(dtype: torch.dtype) -> None:
    x = torch.randn(5, 17, 13).to(dtype)
    x[1, 3, 4] = math.nan
    x[2, 0, 0] = math.inf
    x[3, 16, 12] = -math.inf
    expected = torch.isfinite(x).flatten(1).all(1).tolist()
    assert linalg.finite_rows(x) == expected == [True, False, False, False, True]
    assert linalg.finite_rows(x[0]) == [True]  # one (m, n) matrix
    assert linalg.finite_rows(torch.zeros(2, 0, 3, dtype=dtype)) == [True, True]
    assert linalg.finite_rows(torch.ones(3, 2, 2, dtype=torch.int32)) == [True, True, True]
