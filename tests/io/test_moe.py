"""Mixture-of-experts checkpoints: the ``expert`` column, the router module, per-expert rollups, fused expert tensors.

The fine-tunes change known entries by construction (one bf16 ULP each), so every count below is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import CountingSource, bump_ulps, save_single
from typer.testing import CliRunner

import ckptdiff
from ckptdiff.analyses.full import full_report
from ckptdiff.analyses.principal import PrincipalAnalysis
from ckptdiff.analyses.sparsity import SparsityAnalysis
from ckptdiff.cli import app
from ckptdiff.engine.alignment import align
from ckptdiff.engine.pipeline import Run, execute
from ckptdiff.gate import CheckConfig, StructuralRules
from ckptdiff.gate.check import check
from ckptdiff.io.resolve import logical, open_stored
from ckptdiff.io.views import moe

D, F, E = 16, 24, 4  # hidden size, expert FFN size, routed experts


def qwen2_moe(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two Qwen2-MoE layers: attention, a router, E routed experts, a shared expert and its gate."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, D, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.q_proj.weight"] = torch.randn(D, D, generator=g)
        sd[f"{p}.mlp.gate.weight"] = torch.randn(E, D, generator=g)
        for e in range(E):
            sd[f"{p}.mlp.experts.{e}.gate_proj.weight"] = torch.randn(F, D, generator=g)
            sd[f"{p}.mlp.experts.{e}.up_proj.weight"] = torch.randn(F, D, generator=g)
            sd[f"{p}.mlp.experts.{e}.down_proj.weight"] = torch.randn(D, F, generator=g)
        sd[f"{p}.mlp.shared_expert.gate_proj.weight"] = torch.randn(F, D, generator=g)
        sd[f"{p}.mlp.shared_expert.down_proj.weight"] = torch.randn(D, F, generator=g)
        sd[f"{p}.mlp.shared_expert_gate.weight"] = torch.randn(1, D, generator=g)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(D)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


PLANTED = {
    "model.layers.0.mlp.experts.1.gate_proj.weight": 200,  # expert 1 of layer 0 moves most
    "model.layers.0.mlp.experts.1.down_proj.weight": 100,
    "model.layers.1.mlp.experts.1.up_proj.weight": 10,
    "model.layers.1.mlp.experts.3.down_proj.weight": 50,
    "model.layers.1.mlp.shared_expert.gate_proj.weight": 40,
    "model.layers.0.mlp.gate.weight": 7,
    "model.layers.0.mlp.shared_expert_gate.weight": 3,
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = qwen2_moe()
    ft = dict(base)
    for name, count in PLANTED.items():
        ft[name] = bump_ulps(base[name], torch.arange(count))
    return save_single(base, root / "base.safetensors"), save_single(ft, root / "ft.safetensors")


def test_expert_column_and_router(pair: tuple[Path, Path]) -> None:
    df = ckptdiff.sparsity(*pair, progress=False).to_frame().set_index("tensor")
    assert df.loc["model.layers.0.mlp.experts.1.gate_proj.weight", "expert"] == "1"
    assert df.loc["model.layers.1.mlp.shared_expert.gate_proj.weight", "expert"] == "shared"
    assert df.loc["model.layers.0.mlp.gate.weight", ["module", "expert"]].tolist() == ["router", ""]
    assert df.loc["model.layers.0.mlp.shared_expert_gate.weight", "module"] == "shared_expert_gate"
    assert df.loc["model.layers.0.self_attn.q_proj.weight", "expert"] == ""
    assert df.loc["model.layers.0.mlp.gate.weight", "changed"] == 7


def test_rollups_per_expert(pair: tuple[Path, Path]) -> None:
    r = ckptdiff.sparsity(*pair, progress=False)
    by = r.by("expert")
    assert list(by.index) == ["0", "1", "2", "3", "shared"]
    per_expert = 2 * (2 * F * D + D * F)  # two layers of gate, up and down
    assert (by.loc[["0", "1", "2", "3"], "numel"] == per_expert).all()
    assert by.loc["1", "changed"] == 310 and by.loc["3", "changed"] == 50 and by.loc["0", "changed"] == 0
    assert by.loc["shared", "changed"] == 40 and by.loc["shared", "numel"] == 2 * 2 * F * D
    assert by.loc["1", "sparsity"] == pytest.approx(1 - 310 / per_expert)
    grid = r.expert_grid()
    assert list(grid.index) == ["0", "1", "2", "3", "shared"] and set(grid.columns) == {"gate", "up", "down"}
    assert grid.loc["1", "gate"] == pytest.approx(1 - 200 / (2 * F * D))
    assert pd.isna(grid.loc["shared", "up"])  # this shared expert stores no up_proj
    top = r.top_experts(3)
    assert list(top.index) == [(0, "1"), (1, "shared"), (1, "3")]  # 300/1152, 40/768, 50/1152
    assert top.iloc[0]["changed"] == 300 and top.iloc[0]["density"] == pytest.approx(300 / (2 * F * D + D * F))
    titles = [t.title for t in r.report().tables]
    assert any("expert x module" in t for t in titles) and any("moved most" in t for t in titles)


def test_every_command_has_the_expert_column(pair: tuple[Path, Path], tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    frames = {
        "principal": ckptdiff.principal_overlap(*pair, k=4, progress=False).to_frame(),
        "spectral": ckptdiff.spectral(*pair, k=4, progress=False).to_frame(),
        "consistency": ckptdiff.consistency(pair[0], [pair[1], pair[1]], progress=False).to_frame(),
    }
    for what, df in frames.items():
        cols = list(df.columns)
        assert cols[cols.index("module") + 1] == "expert", what
        assert set(df.loc[df["tensor"] == name, "expert"]) == {"3"}, what
    tensors = full_report(pair[0], [pair[1]], k=4, progress=False).tensors()
    assert list(tensors.columns).count("expert") == 1
    report = check(*pair, CheckConfig(structural=StructuralRules(same_keys=True)), header_only=True)
    assert report.passed
    res = CliRunner().invoke(app, ["sparsity", str(pair[0]), str(pair[1]), "-q", "-f", "csv"])
    header, *lines = res.stdout.splitlines()
    assert "expert" in header.split(",") and any(line.startswith(name + ",,1,down,3,") for line in lines)


def test_no_experts_no_expert_tables(tmp_path: Path) -> None:
    from factory import llama_like

    sd = llama_like(layers=1)
    a = save_single(sd, tmp_path / "a.safetensors")
    r = ckptdiff.sparsity(a, a, progress=False)
    assert r.by("expert").empty and r.expert_grid().empty and r.top_experts().empty
    assert not any("expert" in t.title for t in r.report().tables)
    assert set(r.to_frame()["expert"]) == {""}


# ---------------------------------------------------------------------------------------------
# fused expert tensors (gpt-oss, Llama 4): one tensor per expert


def gpt_oss(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = "model.layers.0.mlp"
    sd = {
        f"{p}.router.weight": torch.randn(E, D, generator=g),
        f"{p}.router.bias": torch.randn(E, generator=g),
        f"{p}.experts.gate_up_proj": torch.randn(E, D, 2 * F, generator=g),
        f"{p}.experts.gate_up_proj_bias": torch.randn(E, 2 * F, generator=g),
        f"{p}.experts.down_proj": torch.randn(E, F, D, generator=g),
        f"{p}.experts.down_proj_bias": torch.randn(E, D, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(D, D, generator=g),
    }
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fused")
    base = gpt_oss()
    ft = dict(base)
    flat = base[GATE_UP].reshape(-1)
    per = D * 2 * F
    idx = torch.cat([torch.arange(2 * per, 2 * per + 30), torch.arange(3 * per + 5, 3 * per + 9)])  # experts 2, 3
    ft[GATE_UP] = bump_ulps(flat, idx).reshape(base[GATE_UP].shape)
    return save_single(base, root / "base.safetensors"), save_single(ft, root / "ft.safetensors")


def test_fused_tensors_split_per_expert(fused: tuple[Path, Path]) -> None:
    src = logical(open_stored(str(fused[0])))
    assert isinstance(src, moe.SplitExpertsSource) and "4 fused expert tensors split into 16" in src.resolved
    assert GATE_UP not in src.infos and src.infos[GATE_UP + "[2]"].shape == (D, 2 * F)
    whole = open_stored(str(fused[0])).read_full(GATE_UP)
    for e in range(E):
        assert torch.equal(src.read_full(f"{GATE_UP}[{e}]"), whole[e])
    assert torch.equal(src.read(f"{GATE_UP}[1]", 5, 7), whole[1].reshape(-1)[5:12])
    r = ckptdiff.sparsity(*fused, progress=False)
    df = r.to_frame().set_index("tensor")
    assert df.loc[[f"{GATE_UP}[{e}]" for e in range(E)], "changed"].tolist() == [0, 0, 30, 4]
    assert df.loc[f"{GATE_UP}[3]", ["layer", "module", "expert", "shape"]].tolist() == [0, "gate_up", "3", "16x48"]
    assert df.loc["model.layers.0.mlp.experts.down_proj_bias[1]", ["module", "expert"]].tolist() == ["down", "1"]
    assert r.by("expert").loc["2", "changed"] == 30
    assert r.overall()["numel"] == sum(v.numel() for v in gpt_oss().values())
    p = ckptdiff.principal_overlap(*fused, k=4, progress=False).to_frame().set_index("tensor")
    assert p.loc[f"{GATE_UP}[2]", "analysed"] and p.loc[f"{GATE_UP}[2]", "changed"] == 30


def test_fused_slices_read_each_byte_once(fused: tuple[Path, Path]) -> None:
    srcs = [CountingSource(open_stored(str(p))) for p in fused]
    views = [logical(s) for s in srcs]
    items = align(views, labels=["base", "ft"])
    run = Run(tuple(views), ("base", "ft"), tuple(items), torch.device("cpu"), 2 * 1024**3, chunk_bytes=2 * 100)
    s, _ = execute(run, [SparsityAnalysis(), PrincipalAnalysis(k=4)], progress=False)
    assert s.to_frame().set_index("tensor").loc[f"{GATE_UP}[2]", "changed"] == 30
    for src in srcs:
        for name, info in src.inner.infos.items():
            assert src.bytes[name] == info.nbytes, name


def test_plain_checkpoints_are_not_wrapped(fused: tuple[Path, Path], tmp_path: Path) -> None:
    plain = open_stored(str(save_single({"a.weight": torch.ones(2, 2)}, tmp_path / "p.safetensors")))
    assert logical(plain) is plain
    doc = CliRunner().invoke(
        app, ["check", str(fused[0]), str(fused[1]), "-q", "--header-only", "--same-keys", "-f", "json"]
    )
    assert doc.exit_code == 0 and "split into 16 per-expert tensors" in json.loads(doc.stdout)["header"]["base"]


def test_the_front_door_gives_what_the_analyses_see(fused: tuple[Path, Path]) -> None:
    """``ckptdiff.open`` (and its earlier name ``resolve``) splits the experts as a path does; passing its source to an
    analysis gives the path's numbers; ``stored=True`` keeps the fused tensor and is compared as stored."""
    base, ft = (str(p) for p in fused)
    viewed = ckptdiff.open(base)
    assert GATE_UP not in viewed.infos and GATE_UP + "[2]" in viewed.infos
    assert ckptdiff.resolve is ckptdiff.open and ckptdiff.open(viewed) is viewed  # viewing twice changes nothing
    by_path = ckptdiff.sparsity(base, ft, progress=False).to_frame().set_index("tensor")["changed"]
    by_source = ckptdiff.sparsity(viewed, ckptdiff.open(ft), progress=False).to_frame().set_index("tensor")["changed"]
    pd.testing.assert_series_equal(by_source, by_path)
    assert by_path[GATE_UP + "[2]"] == 30 and by_path[GATE_UP + "[3]"] == 4  # the bumps planted in the fixture
    stored = ckptdiff.sparsity(ckptdiff.open(base, stored=True), ckptdiff.open(ft, stored=True), progress=False)
    rows = stored.to_frame().set_index("tensor")["changed"]
    assert GATE_UP in rows.index and rows[GATE_UP] == 34 and GATE_UP + "[2]" not in rows.index
