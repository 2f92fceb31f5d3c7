"""The guarded fast path (issue 26 item 2): svdvals for the spectrum, randomized top-k + fp64 Rayleigh-Ritz for the
top vectors, each matrix checked by the Wedin residual bound and decomposed exactly where the check fails.

Expected values come from the plain fp64 LAPACK SVD (torch.linalg.svd) of the same matrices, and from matrices
whose spectra are planted by construction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from factory import save_single

from ckptdiff.analyses.spectral import METRIC_COLUMNS, spectral
from ckptdiff.metrics import linalg

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "checkpoints"


def planted(b: int, m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """(b, m, n) fp64 stack with singular values exactly ``s`` (length min(m, n)) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    out = []
    for _ in range(b):
        qa = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
        qb = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
        out.append((qa * s) @ qb.mT)
    return torch.stack(out)


def max_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the spans of orthonormal a, b (m, k), via sin = ‖(I − a aᵀ) b‖₂."""
    return math.asin(min(1.0, float(torch.linalg.matrix_norm(b - a @ (a.mT @ b), ord=2))))


def test_a_gapped_spectrum_passes_the_check_and_matches_the_exact_subspace() -> None:
    k, p = 6, 60
    s = torch.cat(
        [torch.linspace(10, 5, k, dtype=torch.float64), 0.5 * 0.97 ** torch.arange(p - k, dtype=torch.float64)]
    )
    a = planted(2, 90, p, s, seed=1)
    need = linalg.Need(values=True, left=k, right=k, dtype=torch.float64, method="randomized")
    dec = linalg.decompose(a, need)
    assert all(x.startswith("checked(") for x in dec.methods)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(dec.s, s_ref, rtol=1e-12, atol=0)  # every value, from svdvals
    for i in range(2):  # the Wedin tolerance: sin θ <= FAST_SIN_TOL on both sides
        assert max_angle(u_ref[i, :, :k], dec.u[i]) <= 2 * linalg.FAST_SIN_TOL
        assert max_angle(vh_ref[i, :k].mT, dec.v[i]) <= 2 * linalg.FAST_SIN_TOL


def test_a_tiny_gap_fails_the_check_and_falls_back_to_exact_for_that_matrix_only() -> None:
    k, p = 5, 40
    gapped = torch.cat([torch.full((k,), 4.0, dtype=torch.float64) - torch.arange(k) * 0.1, torch.full((p - k,), 1.0)])
    tiny = gapped.clone()
    tiny[k] = tiny[k - 1] - 1e-9  # σ_k − σ_{k+1} = 1e-9: the top-k subspace is barely defined
    tiny[k:] = torch.sort(tiny[k:], descending=True).values
    a = torch.cat([planted(1, 50, p, gapped.double(), seed=2), planted(1, 50, p, tiny.double(), seed=3)])
    _, _, bound, ok = linalg.checked_topk(a, k, torch.linalg.svdvals(a))
    assert ok == [True, False] and float(bound[1]) > linalg.FAST_SIN_TOL
    dec = linalg.decompose(a, linalg.Need(values=True, left=k, right=k, dtype=torch.float64, method="randomized"))
    # The tiny gap is seen in the exact spectrum before any iteration: that matrix goes to the exact route at once.
    assert linalg.likely_to_converge(torch.linalg.svdvals(a), k, k + 10) == [True, False]
    assert dec.methods[0].startswith("checked(") and dec.methods[1] == "exact (gap)"
    u_ref = torch.linalg.svd(a[1], full_matrices=False)[0][:, :k]
    assert max_angle(u_ref, dec.u[1]) < 1e-10  # the fallback is the exact decomposition


@pytest.mark.parametrize("null", ["none", "random"])
def test_spectral_fast_path_equals_exact_on_the_shipped_examples(null: str) -> None:
    """Every CSV figure within the stated tolerances, every angles verdict identical, on the shipped RL pair."""
    base, ft = str(EXAMPLES / "base"), str(EXAMPLES / "rl_seed1")
    opts: dict[str, Any] = {"k": 8, "null": null, "include": ["*layers.0.*"], "progress": False}
    fast = spectral(base, ft, svd="randomized", **opts)
    exact = spectral(base, ft, svd="exact", **opts)
    assert "svd_routes" in fast.header
    f, e = fast.to_frame(), exact.to_frame()
    pd.testing.assert_series_equal(f["angles"], e["angles"])
    values = [c for c in METRIC_COLUMNS if not c.startswith("angle")]
    pd.testing.assert_frame_equal(f[values], e[values], rtol=1e-9, atol=1e-12)
    angles = [c for c in f.columns if c.startswith("angle_") and c != "angles"]
    assert (f[angles] - e[angles]).abs().max().max() <= 1e-6  # degrees


def test_spectral_fast_path_on_a_planted_pair_takes_the_fast_route(tmp_path: Path) -> None:
    k, p = 10, 48  # k = --intruder-k: the fine-tune side's top vectors serve the angles and the intruder count
    s = torch.cat([torch.linspace(9.0, 4.5, k, dtype=torch.float64), 0.3 * 0.95 ** torch.arange(p - k)])
    w0 = planted(1, 64, p, s.double(), seed=4)[0]
    g = torch.Generator().manual_seed(5)
    w1 = w0 + 1e-3 * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    base = save_single({"model.layers.0.mlp.up_proj.weight": w0.float()}, tmp_path / "b.safetensors")
    ft = save_single({"model.layers.0.mlp.up_proj.weight": w1.float()}, tmp_path / "f.safetensors")
    fast = spectral(str(base), str(ft), k=k, svd="randomized", progress=False)
    exact = spectral(str(base), str(ft), k=k, svd="exact", progress=False)
    assert "passed the Wedin residual check" in fast.header["svd_routes"]
    f, e = fast.to_frame(), exact.to_frame()
    assert (f["angles"] == e["angles"]).all()
    for col in ("nss", "angle_u_max_deg", "angle_v_max_deg", "sv_topk_max_rel_change", "gap_k"):
        assert abs(float(f[col].iloc[0]) - float(e[col].iloc[0])) <= 1e-6 * max(1.0, abs(float(e[col].iloc[0])))


def test_a_flat_hint_sends_a_matrix_to_the_exact_route_without_svdvals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base's spectrum (the hint) predicts no convergence: the fine-tune is decomposed once, exactly."""
    k, p = 4, 40
    flat = torch.linspace(1.0, 0.9, p, dtype=torch.float64)  # σ_{q+1} / σ_k close to 1
    a = planted(2, 50, p, flat, seed=6)
    calls: list[int] = []
    real = linalg.svdvals

    def counting(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(linalg, "svdvals", counting)
    need = linalg.Need(values=True, left=k, right=k, dtype=torch.float64, method="randomized")
    dec = linalg.decompose(a, need, hint=torch.stack([flat, flat]))
    assert dec.methods == ("exact (gap)", "exact (gap)") and calls == []
    _, s_ref, _ = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(dec.s, s_ref, rtol=1e-12, atol=0)


def test_auto_keeps_the_exact_route_below_the_size_where_the_fast_path_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """At min(m, n) = 1024 a randomized top-k is allowed (choose_method) but every value is also needed, and svdvals
    alone costs about as much as the full SVD there: auto decomposes exactly, once, without svdvals."""
    p = 1024
    s = torch.cat(
        [torch.linspace(10, 5, 8, dtype=torch.float64), 0.5 * 0.9 ** torch.arange(p - 8, dtype=torch.float64)]
    )
    a = planted(1, p, p, s, seed=8)
    assert p < linalg.FAST_VALUES_MIN_DIM and linalg.choose_method(p, p, 8) == "randomized"
    calls: list[int] = []
    real = linalg.svdvals
    monkeypatch.setattr(linalg, "svdvals", lambda *x, **kw: calls.append(1) or real(*x, **kw))
    dec = linalg.decompose(a, linalg.Need(values=True, left=8, right=8, dtype=torch.float64, method="auto"))
    assert dec.methods == ("exact",) and calls == []
    torch.testing.assert_close(dec.s[0], s, rtol=1e-10, atol=1e-12)
