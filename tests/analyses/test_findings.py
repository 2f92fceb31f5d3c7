"""One digest, one wording: every command lists the same structural findings on the same pair (issue 23 items 1-3)."""

from __future__ import annotations

import pytest
import torch
from factory import save_single

import ckptdiff
from ckptdiff.analyses.base import NON_FINITE

NAN = "model.layers.0.mlp.up_proj.weight"
DTYPE = "model.layers.1.self_attn.q_proj.weight"
EXTRA = "model.extra.weight"


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(12, 8, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8)
    return sd


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    tmp = tmp_path_factory.mktemp("findings")
    base = _state(0)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in base.items()}
    ft[NAN] = ft[NAN].clone()
    ft[NAN][0, 0] = float("nan")  # the fine-tune holds a NaN
    ft[DTYPE] = ft[DTYPE].to(torch.bfloat16)  # one matrix stored in another dtype
    ft[EXTRA] = torch.ones(4, 4)  # a name the base lacks
    b = save_single(base, tmp / "b.safetensors")
    f = save_single(ft, tmp / "f.safetensors")
    same = save_single(base, tmp / "same.safetensors")
    return str(b), str(f), str(same)


def _findings(command: str, base: str, ft: str) -> dict[str, str]:
    run = {"sparsity": ckptdiff.sparsity, "principal": ckptdiff.principal_overlap, "spectral": ckptdiff.spectral}
    report = run[command](base, ft, progress=False).report()
    return dict(zip(report.structural["tensor"], report.structural["detail"], strict=True))


@pytest.mark.parametrize("command", ["sparsity", "principal", "spectral"])
def test_every_command_lists_the_same_findings_in_the_same_words(pair: tuple[str, str, str], command: str) -> None:
    found = _findings(command, *pair[:2])
    assert sorted(found) == sorted([NAN, DTYPE, EXTRA])  # the NaN, the dtype change and the one-sided name
    assert found[EXTRA] == "only in fine-tune"
    assert found[DTYPE] == "fp32 vs bf16"
    assert found[NAN].startswith(NON_FINITE)


def test_self_comparison_ranks_no_rounding_noise(pair: tuple[str, str, str]) -> None:
    base, _, same = pair
    result = ckptdiff.spectral(base, same, k=2, progress=False)
    frame = result.analysed()
    assert len(frame) == 4 and (frame["delta_rel_fro"] == 0).all()
    for column in ("nss", "angle_u_max_deg", "angle_v_max_deg", "angle_u_mean_deg", "angle_v_mean_deg"):
        assert (frame[column] == 0).all(), column  # exactly 0 by construction, not ~1e-13 of SVD rounding
    summary = " ".join(result.report().summary)
    assert "No matrix changed" in summary
    assert "rotate" not in summary and "Largest principal angle" not in summary
