"""ckptdiff.metrics.principal: masks, overlaps, magnitude-matched baselines and update energy
(docs/metrics.md §2, §2b)."""

from __future__ import annotations

import math

import pytest
import torch

from ckptdiff.metrics import linalg
from ckptdiff.metrics.principal import (
    mask_size,
    principal_metrics,
    principal_metrics_with_masks,
    rank_k_magnitude,
    select_mask,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setup(m: int = 256, n: int = 128, k: int = 16, seed: int = 0) -> tuple[torch.Tensor, linalg.TopK]:
    w0 = torch.randn(m, n, generator=gen(seed), dtype=torch.float64).float()
    return w0, linalg.exact_topk(w0, k, dtype=torch.float64)


def triplets(top: linalg.TopK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return top.u[0], top.s[0], top.v[0]


def test_mask_size_rounds_half_up_and_is_exact() -> None:
    assert mask_size(0.5, 7) == 4  # 3.5 -> 4
    assert mask_size(0.3, 10) == 3  # 3.0000000000000004 -> 3
    assert mask_size(0.0, 10) == 0 and mask_size(1.0, 10) == 10
    with pytest.raises(ValueError):
        mask_size(1.5, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_select_mask_matches_sort_with_index_tie_break(dtype: torch.dtype, largest: bool) -> None:
    x = (torch.randint(-6, 7, (37, 23), generator=gen(3)) * 0.5).to(dtype)  # heavy ties, both signs
    flat = x.reshape(-1).double().abs().tolist()
    for count in (0, 1, 100, 425, 850, 851):
        order = sorted(range(len(flat)), key=lambda i: ((-flat[i]) if largest else flat[i], i))
        expected = torch.zeros(len(flat), dtype=torch.bool)
        expected[order[:count]] = True
        got = select_mask(x, count, largest=largest)
        assert torch.equal(got.reshape(-1), expected), count
        assert int(got.sum()) == count


def test_rank_k_matrix_principal_mask_is_top_alpha_of_w0() -> None:
    m, n, k = 96, 64, 8
    g = gen(4)
    w0 = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    top = linalg.exact_topk(w0, k, dtype=torch.float64)
    count = mask_size(0.5, w0.numel())
    torch.testing.assert_close(rank_k_magnitude(*triplets(top)), w0.abs(), rtol=0, atol=1e-10)
    assert torch.equal(
        select_mask(rank_k_magnitude(*triplets(top)), count, largest=True), select_mask(w0, count, largest=True)
    )


def test_update_on_principal_mask_overlaps_one_and_complement_zero() -> None:
    w0, top = setup()
    _, masks = principal_metrics_with_masks(w0, torch.zeros_like(w0, dtype=torch.bool), *triplets(top), w1=w0)
    on = principal_metrics(w0, masks.principal, *triplets(top), w1=w0 + masks.principal * 1e-3)
    off = principal_metrics(w0, ~masks.principal, *triplets(top), w1=w0 + (~masks.principal) * 1e-3)
    assert on.overlap_principal == 1.0 and off.overlap_principal == 0.0
    assert on.changed_principal == on.principal_size == mask_size(0.5, w0.numel())
    low = principal_metrics(w0, masks.low, *triplets(top), w1=w0)
    assert low.overlap_low == 1.0
    assert low.overlap_principal_not_low == 0.0
    assert masks.principal_not_low.sum() == on.principal_not_low_size
    assert on.baseline_principal_not_low == on.principal_not_low_size / w0.numel()


def test_uniform_random_update_overlaps_alpha() -> None:
    w0, top = setup(512, 256, 16)
    update = torch.rand(w0.shape, generator=gen(5)) < 0.3
    r = principal_metrics(w0, update, *triplets(top), alpha=0.5, w1=w0)
    # |M ∩ region| is hypergeometric, std <= sqrt(α(1-α)/|M|) ≈ 0.0025 for |M| ≈ 39k; allow 5 std.
    tol = 5 * math.sqrt(0.25 / r.changed)
    for value in (r.overlap_principal, r.overlap_low):
        assert abs(value - 0.5) < tol
    assert abs(r.overlap_principal_not_low - r.baseline_principal_not_low) < 5 * math.sqrt(0.25 / r.changed)
    assert abs(r.ratio_principal - 1) < 2 * tol and abs(r.ratio_low - 1) < 2 * tol


def test_magnitude_matched_baseline_matches_brute_force() -> None:
    m, n = 12, 10
    w0 = (torch.randn(m, n, generator=gen(6)) * 4).bfloat16()
    w0[0, :3] = 0.0
    top = linalg.exact_topk(w0, 3, dtype=torch.float64)
    update = torch.rand(m, n, generator=gen(7)) < 0.4
    r, masks = principal_metrics_with_masks(w0, update, *triplets(top), alpha=0.3, w1=w0.float())
    vals = w0.float().reshape(-1).tolist()
    upd = update.reshape(-1).tolist()
    for region, got in ((masks.principal, r.baseline_principal_magnitude), (masks.low, r.baseline_low_magnitude)):
        reg = region.reshape(-1).tolist()
        bins: dict[int, list[int]] = {}
        for v, u, c in zip(vals, upd, reg, strict=True):
            key = -(10**6) if v == 0 else math.frexp(abs(v))[1] - 1  # floor(log2|v|)
            nb, ub, cb = bins.get(key, [0, 0, 0])
            bins[key] = [nb + 1, ub + int(u), cb + int(c)]
        expected = sum(ub * cb / nb for nb, ub, cb in bins.values()) / sum(ub for _, ub, _ in bins.values())
        assert got == pytest.approx(expected, rel=1e-12)
    assert r.ratio_principal_magnitude == pytest.approx(r.overlap_principal / r.baseline_principal_magnitude)


def test_empty_update_gives_nan_not_errors() -> None:
    w0, top = setup(64, 32, 4)
    r = principal_metrics(w0, torch.zeros_like(w0, dtype=torch.bool), *triplets(top), w1=w0)
    assert r.changed == 0 and r.update_density == 0.0
    for value in (r.overlap_principal, r.overlap_low, r.ratio_low, r.baseline_low_magnitude, r.energy_principal):
        assert math.isnan(value)


def test_energy_of_update_in_top_k_subspace_is_one() -> None:
    w0, top = setup(128, 96, 8)
    u, s, v = triplets(top)
    a = torch.randn(8, 8, generator=gen(8), dtype=torch.float64)
    delta = u @ a @ v.T  # (m, n), confined to the top-k singular directions
    r = principal_metrics(w0, torch.ones_like(w0, dtype=torch.bool), u, s, v, delta=delta)
    for value in (r.energy_principal, r.energy_left, r.energy_right):
        assert value == pytest.approx(1.0, abs=1e-12)
    assert r.energy_principal_random == 64 / (128 * 96)
    assert r.delta_fro_sq == pytest.approx(float(delta.square().sum()), rel=1e-12)


def test_energy_of_gaussian_update_is_random_value() -> None:
    m, n, k = 512, 256, 64
    w0, top = setup(m, n, k)
    delta = torch.randn(m, n, generator=gen(9), dtype=torch.float64)
    r = principal_metrics(w0, torch.ones_like(w0, dtype=torch.bool), *triplets(top), delta=delta)
    # E_k ≈ χ²(k²)/χ²(mn): relative std ≈ sqrt(2)/k = 0.022; one-sided ≈ sqrt(2/(k·n)) = 0.011. Allow 5 std.
    assert r.energy_principal == pytest.approx(k * k / (m * n), rel=5 * math.sqrt(2) / k)
    assert r.energy_left == pytest.approx(k / m, rel=5 * math.sqrt(2 / (k * n)))
    assert r.energy_right == pytest.approx(k / n, rel=5 * math.sqrt(2 / (k * m)))


def test_w1_and_delta_give_the_same_row() -> None:
    w0, top = setup(64, 48, 4)
    w1 = w0 + 0.01 * torch.randn(w0.shape, generator=gen(10))
    update = w1 != w0
    a = principal_metrics(w0, update, *triplets(top), w1=w1)
    b = principal_metrics(w0, update, *triplets(top), delta=w1.double() - w0.double())
    assert a == b
    with pytest.raises(ValueError):
        principal_metrics(w0, update, *triplets(top))
