"""ckptdiff.metrics.spectral: NSS, top-k σ changes, principal angles, ΔW norms and the random null
(docs/metrics.md §3, §2b)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from ckptdiff.metrics import linalg
from ckptdiff.metrics.spectral import null_seed, principal_angles, spectral_metrics


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(m: int, p: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, p, generator=gen(seed), dtype=torch.float64))[0]


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(s) Vᵀ with random orthonormal U (m, p), V (n, p); returns W, U, V in fp64."""
    u, v = orthonormal(m, len(s), seed), orthonormal(n, len(s), seed + 1)
    return (u * s) @ v.T, u, v


def test_scaling_gives_nss_c_minus_one_and_zero_angles() -> None:
    w0 = torch.randn(2, 64, 40, generator=gen(0), dtype=torch.float64)  # (2, 64, 40)
    for c in (1.5, 0.9):
        for r in spectral_metrics(w0, c * w0, k=8):
            assert r.nss == pytest.approx(abs(c - 1), rel=1e-10)
            assert r.sv_topk_max_rel_change == pytest.approx(abs(c - 1), rel=1e-10)
            assert r.delta_rel_fro == pytest.approx(abs(c - 1), rel=1e-10)
            assert r.nss_per_update == pytest.approx(1.0, rel=1e-10)
            for angle in (r.angle_u_max_deg, r.angle_v_max_deg, r.angle_u_mean_deg, r.angle_v_mean_deg):
                assert angle < 1e-5


@pytest.mark.parametrize("theta", [10.0, 1e-4])
def test_rotating_u1_out_of_top_k_gives_angle_theta(theta: float) -> None:
    m, n, k = 80, 60, 6
    s = torch.linspace(10, 1, 60, dtype=torch.float64)
    w0, u, v = with_spectrum(m, n, s, 1)
    t = math.radians(theta)
    u1 = u.clone()
    u1[:, 0] = math.cos(t) * u[:, 0] + math.sin(t) * u[:, k]
    u1[:, k] = -math.sin(t) * u[:, 0] + math.cos(t) * u[:, k]
    w1 = (u1 * s) @ v.T
    (r,) = spectral_metrics(w0, w1, k=k)
    assert r.angle_u_max_deg == pytest.approx(theta, rel=1e-6)
    assert r.angle_u_mean_deg == pytest.approx(theta / k, rel=1e-6)
    assert r.angle_v_max_deg < 1e-6 * theta + 1e-9
    assert r.nss < 1e-12
    assert r.gap_k == pytest.approx(float(s[k - 1] - s[k]), rel=1e-12)
    # Wedin: sin θ <= ‖ΔW‖₂ / γ_k.
    assert r.angle_u_max_deg <= r.wedin_bound_deg * (1 + 1e-9)


def test_principal_angles_ignore_order_and_sign() -> None:
    a = orthonormal(30, 5, 2)
    b = -a[:, [3, 1, 4, 0, 2]]
    torch.testing.assert_close(principal_angles(a, b), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-7)


def test_rank_one_update_obeys_weyl_and_has_stable_rank_one() -> None:
    w0 = torch.randn(70, 50, generator=gen(3), dtype=torch.float64)
    x, y = (
        torch.randn(70, 1, generator=gen(4), dtype=torch.float64),
        torch.randn(50, 1, generator=gen(5), dtype=torch.float64),
    )
    w1 = w0 + 0.3 * x @ y.T
    (r,) = spectral_metrics(w0, w1, k=10)
    assert r.delta_spectral_norm == pytest.approx(0.3 * float(x.norm() * y.norm()), rel=1e-12)
    assert r.delta_stable_rank == pytest.approx(1.0, rel=1e-10)
    change = (linalg.svdvals(w1, torch.float64) - linalg.svdvals(w0, torch.float64)).abs()
    assert float(change.max()) <= r.delta_spectral_norm * (1 + 1e-12)  # Weyl
    s0 = linalg.svdvals(w0, torch.float64)[0]
    assert r.sv_topk_max_rel_change <= float((r.delta_spectral_norm / s0[:10]).max())
    assert r.nss * float(s0.norm()) <= r.delta_rel_fro * float(s0.norm()) * (1 + 1e-12)  # Mirsky


@pytest.mark.parametrize("kind", ["random", "decaying"])
def test_agrees_with_numpy_fp64(kind: str) -> None:
    m, n, k = 72, 48, 5
    if kind == "random":
        w0 = torch.randn(m, n, generator=gen(6), dtype=torch.float64)
    else:
        w0 = with_spectrum(m, n, torch.arange(1, n + 1, dtype=torch.float64) ** -0.5, 6)[0]
    w1 = w0 + 0.05 * w0.std() * torch.randn(m, n, generator=gen(7), dtype=torch.float64)
    (r,) = spectral_metrics(w0, w1, k=k)
    a0, a1 = w0.numpy(), w1.numpy()
    u0, s0, vh0 = np.linalg.svd(a0, full_matrices=False)
    u1, s1, vh1 = np.linalg.svd(a1, full_matrices=False)
    assert r.nss == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-9)
    assert r.sv_topk_max_rel_change == pytest.approx(np.max(np.abs(s1[:k] - s0[:k]) / s0[:k]), rel=1e-9)
    cos_u = np.clip(np.linalg.svd(u0[:, :k].T @ u1[:, :k], compute_uv=False), 0, 1)
    cos_v = np.clip(np.linalg.svd(vh0[:k] @ vh1[:k].T, compute_uv=False), 0, 1)
    assert r.angle_u_max_deg == pytest.approx(np.degrees(np.arccos(cos_u.min())), rel=1e-6)
    assert r.angle_v_mean_deg == pytest.approx(np.degrees(np.arccos(cos_v)).mean(), rel=1e-6)
    assert r.gap_k == pytest.approx(s0[k - 1] - s0[k], rel=1e-9)
    d = a1 - a0
    sd = np.linalg.svd(d, compute_uv=False)
    assert r.delta_spectral_norm == pytest.approx(sd[0], rel=1e-10)
    assert r.delta_rel_fro == pytest.approx(np.linalg.norm(d) / np.linalg.norm(a0), rel=1e-10)
    assert r.delta_stable_rank == pytest.approx((sd**2).sum() / sd[0] ** 2, rel=1e-10)


def test_fp32_agrees_with_fp64_on_near_identical_matrices() -> None:
    """RL-like drift, ΔW ≈ 1e-5 relative: fp32 agrees with fp64 only up to fp32's own error, which is NOT small here.

    Backward-stable fp32 SVD gives |σ_i error| <= c·eps32·σ_1 per side (c = 10 is generous at this size), so the
    NSS error is at most 2·c·eps32·σ_1·sqrt(p)/‖σ(W0)‖ (≈ 4e-6 here, above NSS ≈ 8e-7 itself), and angle errors
    are at most about c·eps32·σ_1/γ_k radians. Hence spectral_metrics defaults to fp64.
    """
    m, n, k = 128, 96, 8
    s = torch.linspace(4, 0.5, n, dtype=torch.float64)
    w0 = with_spectrum(m, n, s, 8)[0].float()
    w1 = w0 + 1e-5 * float(w0.std()) * torch.randn(m, n, generator=gen(9))
    (r64,) = spectral_metrics(w0, w1, k=k, dtype=torch.float64)
    (r32,) = spectral_metrics(w0, w1, k=k, dtype=torch.float32)
    eps32, c = float(torch.finfo(torch.float32).eps), 10.0
    nss_tol = 2 * c * eps32 * float(s[0]) * math.sqrt(n) / float(s.norm())
    assert abs(r32.nss - r64.nss) <= nss_tol
    angle_tol = math.degrees(c * eps32 * float(s[0]) / r64.gap_k)
    assert abs(r32.angle_u_max_deg - r64.angle_u_max_deg) <= angle_tol
    # ΔW itself is formed exactly from the fp32 inputs, so its norms agree to fp32 rounding.
    assert r32.delta_rel_fro == pytest.approx(r64.delta_rel_fro, rel=1e-5)
    assert r32.delta_spectral_norm == pytest.approx(r64.delta_spectral_norm, rel=1e-4)


def test_null_is_seeded_per_matrix_and_independent_of_batch() -> None:
    w0 = torch.randn(3, 40, 30, generator=gen(10), dtype=torch.float64)  # (3, 40, 30)
    w1 = w0 + 0.01 * torch.randn(3, 40, 30, generator=gen(11), dtype=torch.float64)
    names = ["a.weight", "b.weight", "c.weight"]
    seeds = [null_seed(0, nm) for nm in names]
    batched = spectral_metrics(w0, w1, k=4, null_seeds=seeds)
    alone = spectral_metrics(w0[2], w1[2], k=4, null_seeds=[seeds[2]])[0]
    assert batched[2].nss_null == pytest.approx(alone.nss_null, rel=1e-12)
    assert batched[2].angle_u_max_deg_null == pytest.approx(alone.angle_u_max_deg_null, rel=1e-10)
    assert null_seed(0, "a.weight") == zlib.crc32(b"0:a.weight")
    # A Gaussian update is its own equal-norm null: ratios near 1 (σ-shift of a random perturbation varies ~10%).
    for r in batched:
        assert r.nss_null_ratio == pytest.approx(1.0, rel=0.3)
    assert all(math.isnan(r.nss_null) for r in spectral_metrics(w0, w1, k=4))


def test_identical_and_full_rank_edge_cases() -> None:
    w0 = torch.randn(20, 12, generator=gen(12), dtype=torch.float64)
    (r,) = spectral_metrics(w0, w0.clone(), k=12, null_seeds=[1])
    assert r.nss == 0.0 and r.delta_spectral_norm == 0.0 and r.nss_null == 0.0
    assert math.isnan(r.gap_k) and math.isnan(r.nss_per_update) and math.isnan(r.nss_null_ratio)
    assert r.k == 12


def test_further_null_draws_are_the_nulls_of_their_own_seeds() -> None:
    """Draw d of ``more_null_seeds`` gives, per matrix, the NSS and largest angles that a one-draw call with those
    seeds gives as its null: the draws are independent nulls, computed beside the first."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(2, 24, 16, generator=g, dtype=torch.float64)
    w1 = w0 + 1e-2 * torch.randn(2, 24, 16, generator=g, dtype=torch.float64)
    first, extra = [11, 12], [[21, 22], [31, 32]]
    got = spectral_metrics(w0, w1, k=4, null_seeds=first, more_null_seeds=extra)
    for d, seeds in enumerate(extra):
        alone = spectral_metrics(w0, w1, k=4, null_seeds=seeds)
        for i in range(2):
            want = (alone[i].nss_null, alone[i].angle_u_max_deg_null, alone[i].angle_v_max_deg_null)
            assert got[i].more_nulls[d] == pytest.approx(want, rel=1e-12)
    assert got[0].nss_null == pytest.approx(spectral_metrics(w0, w1, k=4, null_seeds=first)[0].nss_null, rel=1e-12)
    assert all(r.more_nulls == () for r in spectral_metrics(w0, w1, k=4, null_seeds=first))
