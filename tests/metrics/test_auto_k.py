"""k that fits the matrix (issue 21 item 4): without --k, spectral picks per matrix the largest k <= 64 whose gap
passes the stability test (σ_k − σ_{k+1} > √2 ‖ΔW‖₂, i.e. a Wedin bound below 45°), so that angles are measurable."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from factory import save_single

from ckptdiff.analyses.spectral import spectral
from ckptdiff.metrics.spectral import spectral_metrics, stable_k

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "checkpoints"


def test_stable_k_is_the_largest_k_whose_gap_exceeds_sqrt2_times_the_update() -> None:
    s = torch.tensor([[10.0, 9.0, 8.0, 5.0, 4.9, 4.8, 4.7], [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4]], dtype=torch.float64)
    d2 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    want = []
    for row, d in zip(s.tolist(), d2.tolist(), strict=True):  # a plain loop over k = 1 .. p − 1
        fits = [k for k in range(1, len(row)) if row[k - 1] - row[k] > math.sqrt(2) * d]
        want.append(max(fits) if fits else 0)
    assert want == [3, 0]
    assert stable_k(s, d2).tolist() == want
    assert stable_k(s, d2, k_max=2).tolist() == [0, 0]  # only k <= k_max is considered


def planted_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (48 x 32) with one large gap after σ_5 and near-equal values elsewhere; W1 = W0 + a small update."""
    g = torch.Generator().manual_seed(0)
    qa = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64)).Q
    qb = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64)).Q
    s = torch.cat([torch.linspace(10.0, 9.96, 5), torch.linspace(5.0, 4.94, 27)]).double()
    w0 = (qa * s) @ qb.mT
    return w0, w0 + 1e-2 * torch.randn(48, 32, generator=g, dtype=torch.float64) / 48**0.5


def test_without_k_each_matrix_gets_the_k_of_its_stable_gap() -> None:
    w0, w1 = planted_pair()
    (auto,) = spectral_metrics(w0, w1, k=None, dtype=torch.float64)
    (fixed,) = spectral_metrics(w0, w1, k=5, dtype=torch.float64)
    # The only gap above √2 ‖ΔW‖₂ is σ_5 − σ_6 ≈ 4.96: k = 5, and the figures equal those at k = 5 given.
    assert auto.k == auto.k_stable == 5
    assert auto.angle_u_max_deg == fixed.angle_u_max_deg and auto.gap_k == fixed.gap_k
    assert auto.wedin_bound_deg < 45
    (at64,) = spectral_metrics(w0, w1, k=20, dtype=torch.float64)
    assert at64.k == 20 and at64.k_stable == 5 and at64.wedin_bound_deg >= 45


def test_the_summary_says_the_rule_and_the_k_that_would_work(tmp_path: Path) -> None:
    w0, w1 = planted_pair()
    name = "model.layers.0.mlp.up_proj.weight"
    b = save_single({name: w0.float()}, tmp_path / "b.safetensors")
    f = save_single({name: w1.float()}, tmp_path / "f.safetensors")
    auto = spectral(str(b), str(f), progress=False)
    assert auto.header["k"].startswith("chosen per matrix")
    assert auto.to_frame()["k"].tolist() == [5] and auto.to_frame()["angles"].tolist() == ["ok"]
    given = spectral(str(b), str(f), k=20, progress=False)
    hint = " ".join(given.report().summary)
    assert "No matrix has stable principal angles" in hint and "--k 5" in hint


def test_the_shipped_examples_get_measurable_angles_without_k() -> None:
    base, ft = str(EXAMPLES / "base"), str(EXAMPLES / "rl_seed1")
    auto = spectral(base, ft, include=["*layers.0.*"], progress=False).to_frame().dropna(subset=["k"])
    at64 = spectral(base, ft, k=64, include=["*layers.0.*"], progress=False).to_frame().dropna(subset=["k"])
    assert (at64["angles"] != "ok").all()  # the finding: k = 64 leaves no angle measurable
    assert (auto["angles"] == "ok").any()
    assert ((auto["angles"] == "ok") == (auto["k_stable"] > 0)).all()
