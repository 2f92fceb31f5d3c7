"""Update masks and magnitude bins (docs/metrics.md §1, §2b), with answers known by construction."""

from __future__ import annotations

import itertools

import pytest
import torch
from factory import bump_ulps

from ckptdiff.metrics.mask import (
    CompareMode,
    comparison_dtype,
    exponent_bins,
    magnitude_matched_intersection,
    magnitude_matched_overlap,
    update_mask,
)


def test_exactly_k_entries_changed() -> None:
    w0 = torch.randn(64, 32).to(torch.bfloat16)
    idx = torch.randperm(w0.numel())[:37]
    w1 = bump_ulps(w0, idx, 1)
    m = update_mask(w0, w1)
    assert int(m.sum()) == 37
    assert set(torch.nonzero(m.reshape(-1)).flatten().tolist()) == set(idx.tolist())


def test_signed_zeros_equal_and_nan_changed() -> None:
    nan = float("nan")
    w0 = torch.tensor([0.0, -0.0, nan, 1.0, nan, 2.0], dtype=torch.bfloat16)
    w1 = torch.tensor([-0.0, 0.0, nan, nan, 1.0, 2.0], dtype=torch.bfloat16)
    expected = [False, False, True, True, True, False]
    for mode in (CompareMode(), CompareMode("rtol", 1e-3), CompareMode("atol", 1e-5)):
        assert update_mask(w0, w1, mode).tolist() == expected, mode


def test_fp32_vs_bf16_rounds_to_bf16() -> None:
    # 1 + 2**-10 rounds to 1.0 in bf16 (8 bits of mantissa): the bf16 fine-tune stores no change.
    w0 = torch.tensor([1.0 + 2**-10, 1.0 + 2**-6, 3.0], dtype=torch.float32)
    w1 = torch.tensor([1.0, 1.0, 3.0], dtype=torch.bfloat16)
    assert comparison_dtype(w0.dtype, w1.dtype) == torch.bfloat16
    assert update_mask(w0, w1).tolist() == [False, True, False]
    # Natively in fp32, the first entry differs.
    assert update_mask(w0, w1.float()).tolist() == [True, True, False]
    # --as bf16 on two fp32 tensors applies the same rounding.
    assert update_mask(w0, w1.float(), CompareMode(as_dtype=torch.bfloat16)).tolist() == [False, True, False]


def test_round_to_nearest_even_tie() -> None:
    # 1 + 2**-8 is exactly halfway between bf16 1.0 and 1 + 2**-7: ties go to the even mantissa, 1.0.
    w0 = torch.tensor([1.0], dtype=torch.float32)
    w1 = torch.tensor([1.0 + 2**-8], dtype=torch.float32)
    assert update_mask(w0, w1, CompareMode(as_dtype=torch.bfloat16)).tolist() == [False]
    w1b = torch.tensor([1.0 + 3 * 2**-8], dtype=torch.float32)  # halfway between 1+2**-7 and 1+2**-6: even is 1+2**-6
    assert update_mask(torch.tensor([1.0 + 2**-6]), w1b, CompareMode(as_dtype=torch.bfloat16)).tolist() == [False]


def test_pnt_prop_e3_rtol_below_2_pow_minus_9_equals_bitwise() -> None:
    """PNT Prop. E.3: on normal bf16 values, the relative test with eta < 2**-9 is exactly the bitwise test."""
    g = torch.Generator().manual_seed(1)
    w0 = (torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g) * 3)).to(torch.bfloat16)
    idx = torch.arange(0, w0.numel(), 3)
    w1 = bump_ulps(w0, idx, 1)  # the smallest possible moves: 1 ULP
    idx2 = torch.arange(1, w0.numel(), 7)
    w1 = bump_ulps(w1, idx2, 5)
    normal = w0.float().abs() >= torch.finfo(torch.bfloat16).tiny
    bit = update_mask(w0, w1)[normal]
    for eta in (1e-3, 2**-9 * 0.999, 1e-6):
        rel = update_mask(w0, w1, CompareMode("rtol", eta))[normal]
        assert torch.equal(rel, bit), eta
    # Above 2**-8 the relative test starts to hide 1-ULP moves: the claim is tight, not vacuous.
    loose = update_mask(w0, w1, CompareMode("rtol", 2**-7))[normal]
    assert int(loose.sum()) < int(bit.sum())


def test_atol_is_magnitude_biased() -> None:
    w0 = torch.tensor([1e-6, 100.0], dtype=torch.float32)
    w1 = torch.tensor([5e-6, 100.0 + 1e-3], dtype=torch.float32)
    assert update_mask(w0, w1, CompareMode("atol", 1e-5)).tolist() == [False, True]


def test_integers_compared_exactly() -> None:
    a = torch.arange(10)
    b = a.clone()
    b[3] = 99
    assert update_mask(a, b).tolist() == [i == 3 for i in range(10)]


def test_exponent_bins() -> None:
    w = torch.tensor([0.0, 1.0, 1.5, 2.0, 0.75, -3.0, 2**-130], dtype=torch.float32)
    bins = exponent_bins(w).tolist()
    assert bins[1:6] == [0, 0, 1, -1, 1]
    assert bins[6] == -127  # every fp32 subnormal shares the bin below the smallest normal exponent (-126)
    w16 = w.to(torch.bfloat16)
    assert exponent_bins(w16).tolist() == bins
    assert bins[0] < min(bins[1:])  # zeros are a bin of their own


def _brute_force_expected_overlap(w0: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> float:
    bins = [int(torch.floor(torch.log2(x.abs()))) if x != 0 else "zero" for x in w0.reshape(-1).float()]
    num = 0.0
    den = 0.0
    for b in set(bins):
        members = [i for i, x in enumerate(bins) if x == b]
        n_b = len(members)
        u_b = sum(bool(u.reshape(-1)[i]) for i in members)
        c_b = sum(bool(c.reshape(-1)[i]) for i in members)
        num += u_b * c_b / n_b
        den += u_b
    return num / den


def test_exponent_bins_match_log2_on_random_values() -> None:
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        scale = torch.exp(torch.randn(10_000, generator=g, dtype=torch.float64))
        w = (torch.randn(10_000, generator=g, dtype=torch.float64) * scale).to(dtype)
        w = w[w.abs().to(torch.float64) >= torch.finfo(dtype).tiny]  # normal values
        expected = torch.floor(torch.log2(w.to(torch.float64).abs())).to(torch.int64)
        assert torch.equal(exponent_bins(w), expected), dtype


def test_magnitude_matched_overlap_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    w0 = (torch.randn(12, 9, generator=g) * 4).to(torch.bfloat16)
    w0[0, 0] = 0.0
    w0[1, 1] = 0.0
    u = torch.rand(12, 9, generator=g) < 0.4
    c = torch.rand(12, 9, generator=g) < 0.5
    expected = _brute_force_expected_overlap(w0, u, c)
    assert magnitude_matched_overlap(exponent_bins(w0), u, c) == pytest.approx(expected, rel=1e-12)


def test_magnitude_matched_intersection_brute_force() -> None:
    g = torch.Generator().manual_seed(4)
    w0 = (torch.randn(10, 10, generator=g) * 3).to(torch.bfloat16)
    a = torch.rand(10, 10, generator=g) < 0.3
    b = torch.rand(10, 10, generator=g) < 0.6
    bins = [int(torch.floor(torch.log2(x.abs()))) for x in w0.reshape(-1).float()]
    expected = 0.0
    for key in set(bins):
        members = [i for i, x in enumerate(bins) if x == key]
        a_b = sum(bool(a.reshape(-1)[i]) for i in members)
        b_b = sum(bool(b.reshape(-1)[i]) for i in members)
        expected += a_b * b_b / len(members)
    assert magnitude_matched_intersection(exponent_bins(w0), a, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("a", "b"), list(itertools.product([torch.bfloat16, torch.float16, torch.float32], repeat=2)))
def test_comparison_dtype_is_lossless_for_both(a: torch.dtype, b: torch.dtype) -> None:
    target = comparison_dtype(a, b)
    if a == b:
        assert target == a
    elif {a, b} == {torch.bfloat16, torch.float16}:
        assert target == torch.float32
    else:
        assert target in (a, b) and target != torch.float32
