"""The cheaper SVD routes of ckptdiff.metrics.linalg give what the plain ones gave (docs/metrics.md §2, §3).

lowrank_svd is torch.svd_lowrank op for op; spectrum_topk (QR of the long side first) and top_singular_value
(Gram eigenvalue) are exact, and spectral's results equal those of the previous routes (a full LAPACK SVD per side,
svdvals for ‖ΔW‖₂) within 1e-10 relative.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from ckptdiff.metrics import linalg
from ckptdiff.metrics import spectral as S


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying(b: int, m: int, n: int, seed: int, power: float = 0.7) -> torch.Tensor:
    """(b, m, n) fp64 stack with singular values i^-power (distinct, so every top-k subspace is well defined)."""
    g = gen(seed)
    p = min(m, n)
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -power
    out = []
    for _ in range(b):
        qa = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
        qb = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
        out.append((qa * s) @ qb.mT)
    return torch.stack(out)


@pytest.fixture
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shape", [(3, 60, 40), (2, 40, 90), (1, 50, 50)])
def test_lowrank_svd_is_torch_svd_lowrank_bit_for_bit(shape: tuple[int, int, int]) -> None:
    a = torch.randn(*shape, generator=gen(1))
    torch.manual_seed(7)
    u0, s0, v0 = torch.svd_lowrank(a, q=12, niter=3)
    torch.manual_seed(7)
    u1, s1, v1 = linalg.lowrank_svd(a, 12, 3)
    assert torch.equal(u0, u1) and torch.equal(s0, s1) and torch.equal(v0, v1)


def test_serial_lapack_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with linalg._serial_lapack(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), linalg._serial_lapack(torch.device("cpu")):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_randomized_topk_is_repeatable() -> None:
    w = decaying(2, 120, 80, seed=2)
    a, b = linalg.randomized_topk(w, 6, seed=3), linalg.randomized_topk(w, 6, seed=3)
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)


def max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the spans of orthonormal a, b (..., m, k)."""
    return float(S.principal_angles(a, b).max())


@pytest.mark.parametrize(
    "shape", [(2, 40, 120), (2, 120, 40), (1, 30, 41), (1, 41, 30), (1, 36, 44), (1, 50, 50), (1, 64, 1)]
)
@pytest.mark.parametrize("k", [1, 7, 30])
def test_spectrum_topk_is_the_exact_svd(shape: tuple[int, int, int], k: int) -> None:
    w = decaying(*shape, seed=4)
    s, u, v = linalg.spectrum_topk(w, k, torch.float64)
    ru, rs, rvh = torch.linalg.svd(w, full_matrices=False)
    kk = min(k, rs.shape[-1])
    assert u.shape == (*shape[:2], kk) and v.shape == (shape[0], shape[2], kk)
    assert torch.allclose(s, rs, rtol=1e-12, atol=1e-14)
    eye = torch.eye(kk, dtype=torch.float64)
    assert torch.allclose(u.mT @ u, eye, atol=1e-12) and torch.allclose(v.mT @ v, eye, atol=1e-12)
    assert torch.allclose(w @ v, u * s[..., None, :kk], atol=1e-12)  # A v_i = σ_i u_i
    assert max_angle(u, ru[..., :kk]) < 1e-9 and max_angle(v, rvh[..., :kk, :].mT) < 1e-9


def test_spectrum_topk_in_fp32_and_from_bf16() -> None:
    w = decaying(1, 30, 90, seed=5).to(torch.bfloat16)
    s, u, v = linalg.spectrum_topk(w, 5, torch.float32)
    assert s.dtype == u.dtype == v.dtype == torch.float32
    rs = torch.linalg.svdvals(w.double())
    assert torch.allclose(s.double(), rs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 50, 50), (2, 30, 90), (2, 90, 30)])
def test_top_singular_value_matches_svdvals(shape: tuple[int, int, int]) -> None:
    g = gen(6)
    cases = [
        torch.randn(*shape, generator=g, dtype=torch.float64),
        torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, shape[1])[:, None].double(),
        torch.randn(shape[0], shape[1], 1, generator=g, dtype=torch.float64)
        @ torch.randn(shape[0], 1, shape[2], generator=g, dtype=torch.float64),  # rank one
    ]
    for w in cases:
        expected = torch.linalg.svdvals(w)[..., 0]
        got = linalg.top_singular_value(w)
        assert torch.allclose(got, expected, rtol=1e-13, atol=0.0)
    assert torch.equal(linalg.top_singular_value(torch.zeros(*shape, dtype=torch.float64)), torch.zeros(shape[0]))


def previous_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routes before: one full LAPACK SVD per side whatever its shape, svdvals for ‖ΔW‖₂."""
    monkeypatch.setattr(linalg, "QR_FIRST_RATIO", math.inf)
    monkeypatch.setattr(S, "top_singular_value", lambda a, dt: torch.linalg.svdvals(a.to(dt))[..., 0])


@pytest.mark.parametrize("shape", [(2, 60, 160), (2, 160, 60), (1, 70, 70)])
def test_spectral_results_equal_the_previous_routes(
    shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    w0 = decaying(*shape, seed=7, power=0.5)
    w1 = w0 + 1e-2 * w0.std() * torch.randn(w0.shape, generator=gen(8), dtype=torch.float64)
    seeds = [S.null_seed(0, f"m{i}") for i in range(shape[0])]
    new = S.spectral_metrics(w0, w1, 8, null_seeds=seeds)
    previous_routes(monkeypatch)
    old = S.spectral_metrics(w0, w1, 8, null_seeds=seeds)
    for a, b in zip(new, old, strict=True):
        for key, x in asdict(a).items():
            y = asdict(b)[key]
            if isinstance(x, float) and math.isnan(y):
                assert math.isnan(x), key
            else:
                assert x == pytest.approx(y, rel=1e-10, abs=1e-300), key
