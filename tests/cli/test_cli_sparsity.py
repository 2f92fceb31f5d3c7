"""`ckptdiff sparsity` end to end through typer's CliRunner, on checkpoints with known differences."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import bump_ulps, llama_like, save_sharded, save_single
from typer.testing import CliRunner

from ckptdiff.analyses.sparsity import COLUMNS, sparsity
from ckptdiff.cli import app

runner = CliRunner()
REQUIRED = ["tensor", "layer", "module", "shape", "dtype_base", "dtype_ft", "numel", "changed", "sparsity", "status"]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """Base and fine-tune with a known number of 1-ULP changes per tensor, sharded at different boundaries."""
    base = llama_like(layers=3, seed=1)
    ft = {k: v.clone() for k, v in base.items()}
    planted: dict[str, int] = {}
    g = torch.Generator().manual_seed(2)
    for i, (k, v) in enumerate(base.items()):
        k_changed = (7 * i) % max(1, v.numel() // 3)
        idx = torch.randperm(v.numel(), generator=g)[:k_changed]
        ft[k] = bump_ulps(v, idx, 1)
        planted[k] = k_changed
    save_sharded(base, tmp_path / "base", [4, 9, len(base) - 13])
    save_sharded(ft, tmp_path / "ft", [11, len(ft) - 11])
    return tmp_path / "base", tmp_path / "ft", planted


def test_csv_has_known_counts(pair: tuple[Path, Path, dict[str, int]], tmp_path: Path) -> None:
    base, ft, planted = pair
    out = tmp_path / "out.csv"
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--csv", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert set(REQUIRED) <= set(df.columns)
    got = dict(zip(df["tensor"], df["changed"], strict=True))
    assert got == planted
    assert (df["ulp_1"] == df["changed"]).all()
    total = sum(planted.values())
    numel = int(df["numel"].sum())
    lib = sparsity(str(base), str(ft), progress=False)
    assert lib.overall()["sparsity"] == pytest.approx(1 - total / numel)
    assert f"{1 - total / numel:.4f}" in res.stdout


def test_rollups_are_parameter_weighted(pair: tuple[Path, Path, dict[str, int]]) -> None:
    base, ft, planted = pair
    r = sparsity(str(base), str(ft), progress=False)
    by_module = r.by("module")
    q = {k: v for k, v in planted.items() if ".q_proj." in k}
    q_numel = 16 * 16 * len(q)
    assert by_module.loc["q", "sparsity"] == pytest.approx(1 - sum(q.values()) / q_numel)
    lin = {k: v for k, v in planted.items() if ".layers." in k and "norm" not in k}
    lin_numel = sum(llama_like(layers=3)[k].numel() for k in lin)
    assert r.linear_only()["sparsity"] == pytest.approx(1 - sum(lin.values()) / lin_numel)
    layer1 = {k: v for k, v in planted.items() if ".layers.1." in k}
    l1_numel = sum(llama_like(layers=3)[k].numel() for k in layer1)
    assert r.by("layer").loc[1, "sparsity"] == pytest.approx(1 - sum(layer1.values()) / l1_numel)


def test_json_md_and_formats(pair: tuple[Path, Path, dict[str, int]], tmp_path: Path) -> None:
    base, ft, _ = pair
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--json", str(out), "-f", "md", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["header"]["comparison"] == "bitwise"
    assert str(base) in doc["header"]["base"] and doc["header"]["ckptdiff"]
    assert len(doc["tensors"]) == len(llama_like(layers=3))
    assert res.stdout.startswith("## ckptdiff sparsity")
    res_csv = runner.invoke(app, ["sparsity", str(base), str(ft), "-f", "csv", "-q"])
    assert res_csv.stdout.splitlines()[0].split(",") == COLUMNS


def test_structural_findings_and_non_float(tmp_path: Path) -> None:
    base = llama_like()
    ft = {k: v.clone() for k, v in base.items()}
    base["position_ids"] = torch.arange(8)
    ft["position_ids"] = torch.arange(8)
    ft["position_ids"][2] = 5
    del ft["lm_head.weight"]
    ft["extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    ft["model.norm.weight"] = torch.ones(4, dtype=torch.bfloat16)  # shape change
    ft["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"].float()  # dtype change
    save_single(base, tmp_path / "b.safetensors")
    save_single(ft, tmp_path / "f.safetensors")
    df = sparsity(str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), progress=False).to_frame()
    status = dict(zip(df["tensor"], df["status"], strict=True))
    assert status["lm_head.weight"] == "only_base"
    assert status["extra.weight"] == "only_ft"
    assert status["model.norm.weight"] == "shape_mismatch"
    assert status["model.layers.0.mlp.up_proj.weight"] == "dtype_changed"
    assert status["position_ids"] == "non_float"
    row = df.set_index("tensor").loc["position_ids"]
    assert int(row["changed"]) == 1
    up = df.set_index("tensor").loc["model.layers.0.mlp.up_proj.weight"]
    assert int(up["changed"]) == 0 and up["compared_as"] == "bf16"  # fp32 copy of bf16 values: no change in bf16


def test_fp32_reports_bf16_visible_sparsity(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(100, 100, generator=g)
    w1 = w0.clone()
    # 1000 entries get a tiny fp32 change that bf16 cannot see; 500 get one it can.
    flat = w1.reshape(-1)
    flat[:1000] = flat[:1000] * (1 + 2**-20)
    flat[1000:1500] = flat[1000:1500] * 1.05
    save_single({"model.layers.0.mlp.up_proj.weight": w0}, tmp_path / "b.safetensors")
    save_single({"model.layers.0.mlp.up_proj.weight": w1}, tmp_path / "f.safetensors")
    r = sparsity(str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), progress=False)
    row = r.to_frame().iloc[0]
    expected_native = int((w0 != w1).sum())
    expected_bf16 = int((w0.bfloat16() != w1.bfloat16()).sum())
    assert int(row["changed"]) == expected_native
    assert int(row["changed_bf16"]) == expected_bf16
    assert expected_bf16 >= 500 and expected_bf16 < expected_native
    assert "bf16" in " ".join(r.report().summary)


def test_rtol_atol_as_flags(pair: tuple[Path, Path, dict[str, int]]) -> None:
    base, ft, planted = pair
    total = sum(planted.values())
    r = sparsity(str(base), str(ft), progress=False)
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--rtol", "1e-3", "-f", "json", "-q"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["header"]["comparison"] == "relative, rtol=0.001"
    assert sum(t["changed"] or 0 for t in doc["tensors"]) == total  # 1-ULP moves: rtol < 2**-9 sees them all
    loose = runner.invoke(app, ["sparsity", str(base), str(ft), "--rtol", "0.01", "-f", "json", "-q"])
    assert sum(t["changed"] or 0 for t in json.loads(loose.stdout)["tensors"]) == 0
    assert r.overall()["changed"] == total
    both = runner.invoke(app, ["sparsity", str(base), str(ft), "--rtol", "1e-3", "--atol", "1e-5"])
    assert both.exit_code == 2 and "alternatives" in both.stderr
    bad_as = runner.invoke(app, ["sparsity", str(base), str(ft), "--as", "int8"])
    assert bad_as.exit_code == 2 and "--as" in bad_as.stderr


def test_include_exclude(pair: tuple[Path, Path, dict[str, int]]) -> None:
    base, ft, planted = pair
    r = sparsity(str(base), str(ft), include=["*.mlp.*"], exclude=["*.down_proj.*"], progress=False)
    names = set(r.to_frame()["tensor"])
    assert names == {k for k in planted if ".mlp." in k and "down_proj" not in k}
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--include", "nothing.*"])
    assert res.exit_code == 2 and "match no tensor" in res.stderr


@pytest.mark.parametrize(
    "make_bad",
    ["missing", "empty_dir", "truncated", "missing_shard", "unsafe_pickle", "offline_hub", "bad_device"],
)
def test_bad_input_one_line_exit_2_no_file(
    make_bad: str, pair: tuple[Path, Path, dict[str, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft, _ = pair
    extra: list[str] = []
    bad = str(tmp_path / "nope.safetensors")
    if make_bad == "empty_dir":
        (tmp_path / "empty").mkdir()
        bad = str(tmp_path / "empty")
    elif make_bad == "truncated":
        f = save_single(llama_like(), tmp_path / "t.safetensors")
        f.write_bytes(f.read_bytes()[:-64])
        bad = str(f)
    elif make_bad == "missing_shard":
        (ft / "model-00002-of-00002.safetensors").unlink()
        bad = str(ft)
    elif make_bad == "unsafe_pickle":
        torch.save({"w": torch.zeros(1), "f": print}, tmp_path / "evil.bin")
        bad = str(tmp_path / "evil.bin")
    elif make_bad == "offline_hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        bad = "acme/unknown-model"
    elif make_bad == "bad_device":
        bad = str(ft)
        extra = ["--device", "tpu"]
    out_csv = tmp_path / "o.csv"
    out_json = tmp_path / "o.json"
    res = runner.invoke(app, ["sparsity", str(base), bad, "--csv", str(out_csv), "--json", str(out_json), *extra])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error:")
    assert "Traceback" not in res.output
    assert not out_csv.exists() and not out_json.exists()
    assert not list(tmp_path.glob(".o.*"))  # no temporary leftovers


def test_debug_env_shows_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTDIFF_DEBUG", "1")
    res = runner.invoke(app, ["sparsity", str(tmp_path / "a"), str(tmp_path / "b")])
    assert res.exit_code != 0
    assert res.exception is not None and type(res.exception).__name__ == "InputError"


def test_output_folder_missing(pair: tuple[Path, Path, dict[str, int]], tmp_path: Path) -> None:
    base, ft, _ = pair
    res = runner.invoke(app, ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "no" / "x.csv")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_help_has_example() -> None:
    res = runner.invoke(app, ["sparsity", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
