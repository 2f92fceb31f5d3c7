"""Consistency metrics (docs/metrics.md §4, §2b): answers known by construction."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ckptdiff.errors import InputError
from ckptdiff.metrics.consistency import (
    Consistency,
    combine,
    consistency,
    consistency_from_masks,
    delta_sign,
)
from ckptdiff.metrics.mask import ZERO_BIN, exponent_bins, magnitude_matched_intersection


def _mask(n: int, idx: list[int] | range) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(idx)] = True
    return m


def test_identical_masks_give_jaccard_one() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(1000, generator=gen) < 0.2
    pair = consistency_from_masks([m, m.clone()]).pair(0, 1)
    assert pair.n_a == pair.n_b == pair.n_both == pair.n_union == int(m.sum())
    assert pair.jaccard == 1.0
    assert pair.overlap_a == pair.overlap_b == 1.0


def test_disjoint_masks_give_jaccard_zero() -> None:
    pair = consistency_from_masks([_mask(100, range(0, 30)), _mask(100, range(30, 50))]).pair(0, 1)
    assert (pair.n_a, pair.n_b, pair.n_both, pair.n_union) == (30, 20, 0, 50)
    assert pair.jaccard == 0.0
    assert pair.overlap_a == pair.overlap_b == 0.0
    assert pair.density_a == 0.3 and pair.density_b == 0.2


def test_independent_random_masks_match_random_baseline() -> None:
    # Cells of independent Bernoulli masks: given the union size U ~ Bin(n, s), s = p + q - pq, the
    # intersection is Bin(U, pq / s). So J = |A∩B| / U is unbiased for J0 = pq / s with
    # sd sqrt(J0 (1 - J0) / (n s)); likewise overlap_a = |A∩B| / |A| has sd sqrt(q (1 - q) / (n p)).
    # Tolerance: 5 sd (two-sided miss probability below 1e-6; the seed makes the test deterministic anyway).
    n, p, q = 1_000_000, 0.3, 0.5
    gen = torch.Generator().manual_seed(1234)
    a = torch.rand(n, generator=gen) < p
    b = torch.rand(n, generator=gen) < q
    pair = consistency_from_masks([a, b]).pair(0, 1)
    s = p + q - p * q
    j0 = p * q / s
    assert abs(pair.jaccard - j0) < 5 * math.sqrt(j0 * (1 - j0) / (n * s))
    assert abs(pair.overlap_a - q) < 5 * math.sqrt(q * (1 - q) / (n * p))
    assert abs(pair.overlap_b - p) < 5 * math.sqrt(p * (1 - p) / (n * q))
    # The stored baseline uses the observed densities, so it is exactly pq/(p+q-pq) of those.
    pe, qe = pair.density_a, pair.density_b
    assert pair.jaccard_random == pytest.approx(pe * qe / (pe + qe - pe * qe), rel=1e-12)
    assert pair.overlap_a_random == pytest.approx(qe, rel=1e-12)
    assert pair.overlap_b_random == pytest.approx(pe, rel=1e-12)


def test_magnitude_matched_baseline_matches_brute_force() -> None:
    values = [0.0, 0.0, 0.3, -0.4, 0.26, 0.5, 0.75, -0.9, 1.0, 1.5, -1.9, 3.0, 2.5, 100.0, -0.001, 0.0015]
    w0 = torch.tensor(values, dtype=torch.float32)
    a = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)

    # Brute force in plain Python: bin = floor(log2 |w|), zeros in their own bin.
    groups: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        key = ZERO_BIN if v == 0 else math.frexp(v)[1] - 1
        groups.setdefault(key, []).append(i)
    expected = 0.0
    for idx in groups.values():
        expected += sum(int(a[i]) for i in idx) * sum(int(b[i]) for i in idx) / len(idx)

    pair = consistency_from_masks([a, b], exponent_bins(w0)).pair(0, 1)
    assert pair.expected_magnitude == pytest.approx(expected, rel=1e-12)
    assert pair.expected_magnitude == pytest.approx(magnitude_matched_intersection(exponent_bins(w0), a, b), rel=1e-12)
    n_a, n_b = int(a.sum()), int(b.sum())
    assert pair.jaccard_magnitude == pytest.approx(expected / (n_a + n_b - expected), rel=1e-12)


def test_planted_consensus_histogram_is_recovered() -> None:
    n = 1000
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    changed_by = [
        set(range(0, 100)) | set(range(100, 150)) | set(range(200, 210)),  # run 0
        set(range(0, 100)) | set(range(100, 150)) | set(range(300, 330)),  # run 1
        set(range(0, 100)) | set(range(150, 170)) | set(range(400, 405)),  # run 2
    ]
    fts = []
    for idx in changed_by:
        w1 = w0.clone()
        w1[sorted(idx)] += 1.0  # |w0| < 8 for a seed-7 normal draw, so adding 1 always changes bf16 bits
        fts.append(w1)
    result = consistency(w0, fts)
    # by all 3: 100; by exactly 2: 50 (runs 0,1); by exactly 1: 10 + 30 + 20 + 5 = 65.
    assert result.consensus == (n - 100 - 50 - 65, 65, 50, 100)
    assert result.changed == (160, 180, 125)
    assert result.pair(0, 1).n_both == 150
    assert result.pair(0, 2).n_both == 100
    assert result.pair(1, 2).n_both == 100
    expected_mean = (150 / (160 + 180 - 150) + 100 / (160 + 125 - 100) + 100 / (180 + 125 - 100)) / 3
    assert result.mean_jaccard == pytest.approx(expected_mean, rel=1e-12)


def test_base_against_itself_gives_empty_masks_without_division_error() -> None:
    w0 = torch.randn(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = consistency(w0, [w0.clone(), w0.clone(), w0.clone()])
    assert result.changed == (0, 0, 0)
    assert result.densities == (0.0, 0.0, 0.0)
    assert result.consensus == (64 * 32, 0, 0, 0)
    for pair in result.pairs:
        assert pair.n_union == 0 and pair.density_a == 0.0
        for value in (pair.jaccard, pair.jaccard_random, pair.jaccard_magnitude, pair.overlap_a, pair.same_sign):
            assert math.isnan(value)
    assert math.isnan(result.mean_jaccard)
    assert math.isnan(result.mean_jaccard_random)


def test_same_sign_known_by_construction() -> None:
    w0 = torch.ones(8)
    d_a = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 0.0, 1.0, float("nan")])
    d_b = torch.tensor([2.0, -3.0, -1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    pair = consistency(w0, [w0 + d_a, w0 + d_b]).pair(0, 1)
    # Both changed: entries 0-4 and 7; entry 7 has a NaN delta and no sign.
    assert pair.n_both == 6
    assert pair.n_signed == 5
    assert pair.n_same_sign == 3  # entries 0, 1, 4
    assert pair.same_sign == pytest.approx(3 / 5)


def test_delta_sign_compares_mixed_dtypes_and_ignores_non_finite() -> None:
    w0 = torch.tensor([1.0, 1.0, 1.0, float("inf"), 0.0], dtype=torch.float32)
    w1 = torch.tensor([1.5, 0.5, 1.0, float("inf"), -0.0], dtype=torch.bfloat16)
    assert delta_sign(w0, w1).tolist() == [1, -1, 0, 0, 0]


def test_group_rollup_sums_counts() -> None:
    first = consistency_from_masks([_mask(10, range(0, 4)), _mask(10, range(2, 6))])  # |A∩B| 2, |A∪B| 6
    second = consistency_from_masks([_mask(100, range(0, 10)), _mask(100, range(0, 50))])  # 10, 50
    group = combine([first, second])
    pair = group.pair(0, 1)
    assert group.numel == 110 and group.changed == (14, 54)
    assert pair.jaccard == pytest.approx((2 + 10) / (6 + 50))
    e = 4 * 4 / 10 + 10 * 50 / 100  # Σ p_t q_t n_t
    assert pair.expected_random == pytest.approx(e)
    assert pair.jaccard_random == pytest.approx(e / (14 + 54 - e))
    assert pair.overlap_a_random == pytest.approx(e / 14)
    assert group.consensus == tuple(x + y for x, y in zip(first.consensus, second.consensus, strict=True))
    assert isinstance(group, Consistency)


def test_masks_without_bins_or_signs_leave_those_metrics_nan() -> None:
    pair = consistency_from_masks([_mask(10, [1, 2]), _mask(10, [2, 3])]).pair(0, 1)
    assert pair.jaccard == pytest.approx(1 / 3)
    assert math.isnan(pair.jaccard_magnitude)
    assert math.isnan(pair.same_sign)


def test_fewer_than_two_runs_is_an_input_error() -> None:
    with pytest.raises(InputError, match="at least 2"):
        consistency(torch.zeros(4), [torch.ones(4)])
