"""Chunk-level counts: the numpy fast path and the torch path agree, and ULP buckets are exact."""

from __future__ import annotations

import pytest
import torch
from factory import bump_ulps

from ckptdiff.metrics.mask import CompareMode, update_mask
from ckptdiff.metrics.sparsity import ChangeCounts, count_changes, summarise_changed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_ulp_buckets_known_by_construction(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(10_000, generator=g).to(dtype)
    w0 = torch.where(w0 == 0, torch.ones_like(w0), w0)
    w1 = w0.clone()
    plan = {1: range(100), 2: range(100, 130), 3: range(130, 140), 4: range(140, 145), 9: range(145, 150)}
    plan[40] = range(150, 152)
    for ulps, rng in plan.items():
        w1 = bump_ulps(w1, torch.tensor(list(rng)), ulps)
    c = count_changes(w0, w1)
    assert (c.numel, c.changed) == (10_000, 152)
    assert (c.ulp_1, c.ulp_2, c.ulp_3_4, c.ulp_5_16, c.ulp_gt16) == (100, 30, 15, 5, 2)


def test_numpy_path_matches_torch_path() -> None:
    g = torch.Generator().manual_seed(5)
    n = 3 * (1 << 20) + 17  # several numpy pieces plus a ragged end
    w0 = torch.randn(n, generator=g).to(torch.bfloat16)
    w1 = w0.clone()
    idx = torch.randint(0, n, (50_000,), generator=g)
    w1[idx] = (w1[idx].float() * (1 + torch.rand(idx.numel(), generator=g) * 0.1)).to(torch.bfloat16)
    w0[10], w1[10] = 0.0, -0.0
    w0[11], w1[11] = float("nan"), float("nan")  # bit-identical NaN: changed
    w0[2_500_000], w1[2_500_000] = float("nan"), 1.0
    w1[12] = -w0[12]  # a sign flip
    fast = count_changes(w0, w1)
    expected_changed = int(update_mask(w0, w1).sum())
    assert fast.changed == expected_changed
    # The generic path: a torch mask, then the ULP summary of the masked pairs.
    mask = update_mask(w0, w1)
    slow = ChangeCounts(numel=n) + summarise_changed(w0[mask], w1[mask])
    assert fast == slow
    assert fast.changed_nonfinite == 2


def test_counts_add_over_chunks() -> None:
    w0 = torch.randn(1000).to(torch.bfloat16)
    w1 = bump_ulps(w0, torch.arange(0, 1000, 4), 1)
    whole = count_changes(w0, w1)
    parts = ChangeCounts()
    for s in range(0, 1000, 333):
        parts = parts + count_changes(w0[s : s + 333], w1[s : s + 333])
    assert parts == whole
    assert whole.changed == 250
    assert whole.sparsity == pytest.approx(0.75)


def test_tolerance_modes_count_like_masks() -> None:
    w0 = torch.randn(5000, dtype=torch.float32)
    w1 = w0 + torch.randn(5000) * 1e-4
    for mode in (CompareMode("rtol", 1e-3), CompareMode("atol", 1e-5), CompareMode(as_dtype=torch.bfloat16)):
        assert count_changes(w0, w1, mode).changed == int(update_mask(w0, w1, mode).sum())


def test_empty_and_identical() -> None:
    z = torch.zeros(0, dtype=torch.bfloat16)
    assert count_changes(z, z) == ChangeCounts()
    w = torch.randn(100).to(torch.bfloat16)
    c = count_changes(w, w.clone())
    assert (c.numel, c.changed, c.sparsity) == (100, 0, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_path_agrees_on_special_values(dtype: torch.dtype) -> None:
    """Random bit patterns with zeros, infs, NaNs, subnormals and sign flips: fast counts == mask + summary."""
    g = torch.Generator().manual_seed(7)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 1.0, -1.0])
    n = 600_000
    w0 = torch.randn(n, generator=g).to(dtype)
    w1 = w0.clone()
    pick = torch.randint(0, specials.numel(), (n,), generator=g)
    where0 = torch.rand(n, generator=g) < 0.05
    where1 = torch.rand(n, generator=g) < 0.05
    w0[where0] = specials[pick[where0]].to(dtype)
    w1[where1] = specials[pick[where1].flip(0)].to(dtype) if False else specials[(pick[where1] + 3) % 9].to(dtype)
    flip = torch.rand(n, generator=g) < 0.01
    w1[flip] = -w1[flip]
    near = (torch.rand(n, generator=g) < 0.2) & torch.isfinite(w1) & (w1 != 0)
    w1 = bump_ulps(w1, torch.nonzero(near).flatten(), 3)
    # Keep NaN-free pieces too: the second half has no specials at all.
    w0[n // 2 :] = torch.randn(n - n // 2, generator=g).to(dtype)
    w1[n // 2 :] = bump_ulps(w0[n // 2 :], torch.arange(0, n - n // 2, 5), 1)
    mask = update_mask(w0, w1)
    expected = ChangeCounts(numel=n) + summarise_changed(w0[mask], w1[mask])
    assert count_changes(w0, w1) == expected


def test_high_payload_nan_next_to_tiny_value() -> None:
    """A negative NaN with an all-ones payload is 1 wrapped step from +0: it must count as a NaN change."""
    w0 = torch.zeros(4, dtype=torch.bfloat16)
    w1 = torch.tensor([0, 0, 0, -1], dtype=torch.int16).view(torch.bfloat16)  # 0xFFFF: negative NaN
    c = count_changes(w0, w1)
    assert (c.changed, c.changed_nonfinite, c.ulp_1) == (1, 1, 0)
