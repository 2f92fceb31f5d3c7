"""Regressions found in review: mixed dtypes in one SVD batch, NaN matrices in a gate, --as in spectral rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptdiff import rules as R
from ckptdiff.analyses.check import Shared, check
from ckptdiff.analyses.spectral import spectral
from ckptdiff.metrics.mask import CompareMode
from ckptdiff.sources import resolve
from ckptdiff.stream import align, iter_matrix_batches


def _pair(tmp_path: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> tuple[str, str]:
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    return str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors")


def test_batches_never_mix_dtypes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {"m.a": torch.randn(8, 4, generator=g).bfloat16(), "m.b": torch.randn(8, 4, generator=g)}
    b, _ = _pair(tmp_path, sd, sd)
    src = resolve(b)
    batches = list(iter_matrix_batches([src, src], align([src, src]), lambda shape: 8))
    assert sorted(len(items) for items, _ in batches) == [1, 1]  # same shape, two dtypes: two batches
    for items, (s0, _) in batches:
        assert torch.equal(s0[0], sd[items[0].name])  # fp32 values survive: no rounding to bf16


def test_spectral_of_fp32_matrix_unchanged_by_a_bf16_neighbour(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    b0 = torch.randn(32, 16, generator=g)
    b1 = b0 + 1e-4 * torch.randn(32, 16, generator=g)
    a0 = torch.randn(32, 16, generator=g).bfloat16()
    alone = spectral(*_pair(tmp_path, {"m.b": b0}, {"m.b": b1}), k=4, progress=False, device="cpu").to_frame()
    (tmp_path / "2").mkdir()
    both = spectral(
        *_pair(tmp_path / "2", {"m.a": a0, "m.b": b0}, {"m.a": a0, "m.b": b1}), k=4, progress=False, device="cpu"
    ).to_frame()
    nss_alone = float(alone.set_index("tensor").loc["m.b", "nss"])
    nss_both = float(both.set_index("tensor").loc["m.b", "nss"])
    assert nss_both == pytest.approx(nss_alone, rel=1e-9)


def test_gate_fails_when_a_matrix_holds_nan(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    a0, b0 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    b1 = b0 + 5 * torch.randn(32, 16, generator=g)
    b1[0, 0] = float("nan")
    base, ft = _pair(tmp_path, {"m.a": a0, "m.b": b0}, {"m.a": a0.clone(), "m.b": b1})
    cfg = R.CheckConfig(rules=(R.parse_rule("nss < 0.01"), R.parse_rule("energy_principal <= 1")))
    rep = check(base, ft, cfg, shared=Shared(device="cpu", progress=False, k=4))
    assert not rep.passed
    for r in rep.outcome.results:
        assert not r.passed and [o.tensor for o in r.offenders] == ["m.b"], r


def test_check_as_applies_to_spectral_rules(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(32, 16, generator=g)
    w1 = w0 + 1e-5 * torch.randn(32, 16, generator=g)
    base, ft = _pair(tmp_path, {"m.w": w0}, {"m.w": w1})
    expected = spectral(base, ft, k=4, as_dtype="bf16", progress=False, device="cpu").to_frame()["nss"].iloc[0]
    native = spectral(base, ft, k=4, progress=False, device="cpu").to_frame()["nss"].iloc[0]
    assert expected != pytest.approx(native)  # the rounding matters here, so the test can tell them apart
    cfg = R.CheckConfig(rules=(R.parse_rule("nss < 1"),))
    shared = Shared(device="cpu", progress=False, k=4, mode=CompareMode(as_dtype=torch.bfloat16))
    rep = check(base, ft, cfg, shared=shared)
    assert rep.outcome.results[0].value == pytest.approx(expected, rel=1e-9)
