"""Intruder dimensions (issue 24 item 3; docs/metrics.md §3): planted updates whose count is known by construction.

An intruder is one of the fine-tune's top --intruder-k left singular vectors whose largest |cos| with every base
left singular vector is below --intruder-eps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from factory import save_single

from ckptdiff.analyses.full import full_report
from ckptdiff.analyses.spectral import spectral
from ckptdiff.gate.check import check
from ckptdiff.metrics.spectral import intruders, spectral_metrics
from ckptdiff.render.figures import _module_rows, figures


def orthonormal(m: int, p: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


def base_matrix(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(s) Vᵀ with distinct singular values 2, 1.9, ...; returns W0, U (m, p), s, V (n, p)."""
    p = min(m, n)
    u, v = orthonormal(m, p, seed), orthonormal(n, p, seed + 1)
    s = 2.0 - 0.1 * torch.arange(p, dtype=torch.float64)
    return (u * s) @ v.mT, u, s, v


def outside(u: torch.Tensor, seed: int) -> torch.Tensor:
    """A unit vector outside the span of the orthonormal columns of ``u`` (m, p), m > p."""
    m, p = u.shape
    x = orthonormal(m, p + 1, seed=seed)[:, -1]
    x = x - u @ (u.mT @ x)
    return x / x.norm()


def test_intruders_counts_vectors_whose_best_cosine_is_below_eps() -> None:
    base = torch.eye(4, dtype=torch.float64)[:, :3].unsqueeze(0)  # e1, e2, e3
    ft = torch.stack([torch.eye(4, dtype=torch.float64)[:, 3], torch.full((4,), 0.5, dtype=torch.float64)], 1)
    n, best = intruders(ft.unsqueeze(0), base, 0.5)
    # e4 has cos 0 with every base vector; (1,1,1,1)/2 has cos 0.5 with each, which is not below 0.5.
    assert n.tolist() == [1] and math.isclose(float(best[0]), 0.0, abs_tol=1e-15)


def test_large_update_outside_the_tall_base_column_space_is_one_intruder() -> None:
    m, n = 40, 10
    w0, u, s, v = base_matrix(m, n, seed=0)
    x = orthonormal(m, n + 1, seed=7)[:, -1]
    x = x - u @ (u.mT @ x)  # outside the column space of W0
    x = x / x.norm()
    w1 = w0 + 50.0 * torch.outer(x, v[:, -1])  # along the weakest right direction: W1 = Σ_{i<p} σ_i u_i v_iᵀ + w v_pᵀ
    (r,) = spectral_metrics(w0, w1, k=4, dtype=torch.float64, null_seeds=[3])
    # By construction W1's left vectors are u_1 .. u_{p-1} (cos 1 with the base) and (σ_p u_p + 50 x) / norm, whose
    # largest |cos| with the base is σ_p / sqrt(σ_p² + 50²) < 0.5: exactly one intruder among the top 10.
    assert r.intruders == 1
    assert math.isclose(r.intruder_cos_min, float(s[-1] / math.hypot(float(s[-1]), 50.0)), rel_tol=1e-9)
    assert not math.isnan(r.intruders_null)


def test_large_update_spread_evenly_over_a_square_base_is_one_intruder() -> None:
    m = 32
    w0, u, _, v = base_matrix(m, m, seed=1)
    x = u.sum(1) / math.sqrt(m)  # |cos| = 1/sqrt(32) ≈ 0.18 with every base left vector
    w1 = w0 + 40.0 * torch.outer(x, v[:, -1])
    (r,) = spectral_metrics(w0, w1, k=4, dtype=torch.float64)
    assert r.intruders == 1
    assert r.intruder_cos_min < 0.5


def test_small_update_inside_the_base_top_subspace_has_no_intruder() -> None:
    w0, u, _, v = base_matrix(24, 16, seed=2)
    w1 = w0 + 1e-3 * torch.outer(u[:, 0] + u[:, 1], v[:, 2])
    (r,) = spectral_metrics(w0, w1, k=4, dtype=torch.float64, null_seeds=[5])
    assert r.intruders == 0 and r.intruder_cos_min > 0.99
    assert r.intruders_null == 0  # an equal-norm random update of this size does not grow intruders either


def test_spectral_and_check_count_intruders_per_module(tmp_path: Path) -> None:
    m, n = 40, 10
    w0, u, _, v = base_matrix(m, n, seed=3)
    x = outside(u, seed=9)
    q = "model.layers.0.self_attn.q_proj.weight"
    k_ = "model.layers.0.self_attn.k_proj.weight"
    base = {q: w0.float(), k_: w0.float()}
    ft = {q: (w0 + 50.0 * torch.outer(x, v[:, -1])).float(), k_: (w0 + 1e-4 * torch.outer(u[:, 0], v[:, 0])).float()}
    b, f = save_single(base, tmp_path / "b.safetensors"), save_single(ft, tmp_path / "f.safetensors")
    result = spectral(str(b), str(f), k=4, null="random", progress=False)
    counts = result.to_frame().dropna(subset=["intruders"]).set_index("tensor")["intruders"].astype(int).to_dict()
    assert counts == {q: 1, k_: 0}
    assert result.by("module").loc["q", "intruders"] == 1
    assert "full left singular basis" in result.header["intruders"]
    assert not check(str(b), str(f), rules=["intruders@*q_proj* <= 0"], k=4, progress=False).passed
    assert check(str(b), str(f), rules=["intruders@*k_proj* <= 0"], k=4, progress=False).passed
    # Against only the base's top 2 left vectors, the k_proj fine-tune's top vector (u_1, the update lies inside the
    # top subspace) still counts 0; the header says which basis was used.
    narrow = spectral(str(b), str(f), k=4, intruder_base_k=2, intruder_k=1, progress=False)
    assert "top 2" in narrow.header["intruders"]
    narrow_counts = narrow.to_frame().set_index("tensor")["intruders"].astype(int).to_dict()
    assert narrow_counts[k_] == 0


def test_report_draws_intruders_per_module_beside_the_null(tmp_path: Path) -> None:
    m, n = 40, 10
    w0, u, _, v = base_matrix(m, n, seed=4)
    x = outside(u, seed=11)
    q = "model.layers.0.self_attn.q_proj.weight"
    b = save_single({q: w0.float()}, tmp_path / "b.safetensors")
    f = save_single({q: (w0 + 50.0 * torch.outer(x, v[:, -1])).float()}, tmp_path / "f.safetensors")
    report = full_report(b, [f], k=4, null="random", analyses=["spectral"], progress=False)
    (fig,) = [x for x in figures(report) if x.name.startswith("spectral_intruders")]
    assert "max |cos| < 0.5" in fig.caption and "equal-norm random update" in fig.caption
    assert "<svg" in fig.svg


def test_report_draws_intruders_of_each_stack_apart(tmp_path: Path) -> None:
    """A vision tower beside a text decoder: the per-module rollup is keyed by (stack, module), and the figure has
    one bar per (stack, module), labelled with both, so the vision q_proj's intruder is not the text q_proj's."""
    m, n = 40, 10
    w0, u, _, v = base_matrix(m, n, seed=5)
    x = outside(u, seed=13)
    vision = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    text = "language_model.model.layers.0.self_attn.q_proj.weight"
    b = save_single({vision: w0.float(), text: w0.float()}, tmp_path / "b.safetensors")
    ft = {vision: (w0 + 50.0 * torch.outer(x, v[:, -1])).float(), text: (w0 + 1e-4 * torch.outer(u[:, 0], v[:, 0]))}
    f = save_single({k: t.float() for k, t in ft.items()}, tmp_path / "f.safetensors")
    report = full_report(b, [f], k=4, null="random", analyses=["spectral"], progress=False)
    by_module = report.spectral[next(iter(report.spectral))].by("module")
    assert by_module.loc[("vision", "q"), "intruders"] == 1
    assert by_module.loc[("decoder", "q"), "intruders"] == 0
    (fig,) = [x for x in figures(report) if x.name.startswith("spectral_intruders")]
    assert "<svg" in fig.svg  # drawn: before the fix, the (stack, module) rows were looked up as text and it raised
    # One bar per (stack, module), the stacks as data flows and block order within each:
    rows = [("decoder", "down"), ("vision", "k"), ("decoder", "q"), ("vision", "q"), ("vision", "zz")]
    assert _module_rows(rows) == [
        ("decoder", "q"),
        ("decoder", "down"),
        ("vision", "q"),
        ("vision", "k"),
        ("vision", "zz"),
    ]
    assert _module_rows(["down", "o", "q"]) == ["q", "o", "down"]
