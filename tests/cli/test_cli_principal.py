"""`ckptdiff principal-overlap` end to end, on checkpoints whose updates sit on masks computed independently here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from factory import bump_ulps, save_single
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

import ckptdiff.analyses.principal as P
from ckptdiff.analyses.principal import COLUMNS, load_masks, principal_overlap
from ckptdiff.cli import app
from ckptdiff.gate import METRICS

runner = CliRunner()
K, ALPHA = 8, 0.5
UP = "model.layers.0.mlp.up_proj.weight"  # update exactly on the principal mask
Q = "model.layers.1.self_attn.q_proj.weight"  # same shape as UP (batched with it): update on the complement
DOWN = "model.layers.0.mlp.down_proj.weight"  # random update
REQUIRED = [
    "tensor", "layer", "module", "shape", "k", "alpha", "svd", "update_density", "overlap_principal", "overlap_low",
    "overlap_principal_not_low", "baseline", "ratio_principal", "ratio_low", "baseline_principal_magnitude",
    "baseline_low_magnitude", "energy_principal", "energy_principal_random", "status",
]  # fmt: skip


def ref_principal(w0: torch.Tensor, k: int, alpha: float) -> np.ndarray:
    """Top round(alpha·m·n) of |rank-k W0| by fp64 SVD and argsort, ties to the lower flat index; flat bool mask."""
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    score = ((u[:, :k] * s[:k]) @ vh[:k]).abs().reshape(-1).numpy()
    order = np.lexsort((np.arange(score.size), -score))  # by -|score|, then index
    mask = np.zeros(score.size, dtype=bool)
    mask[order[: math.floor(alpha * score.size + 0.5)]] = True
    return mask


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Base and fine-tune with planted updates; returns paths, the base and the planted flat update masks."""
    g = torch.Generator().manual_seed(0)
    base = {
        UP: torch.randn(48, 32, generator=g),
        Q: torch.randn(48, 32, generator=g),
        DOWN: torch.randn(32, 48, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(32),
    }
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    base["position_ids"] = torch.arange(8)
    ft = {k: v.clone() for k, v in base.items()}
    planted = {
        UP: ref_principal(base[UP], K, ALPHA),
        Q: ~ref_principal(base[Q], K, ALPHA),
        DOWN: (torch.rand(32 * 48, generator=g) < 0.3).numpy(),
    }
    for name, mask in planted.items():
        ft[name] = bump_ulps(base[name], torch.from_numpy(np.flatnonzero(mask)), 1)
    ft["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] * 2
    save_single(base, tmp_path / "b.safetensors")
    save_single(ft, tmp_path / "f.safetensors")
    return tmp_path / "b.safetensors", tmp_path / "f.safetensors", base, planted


def run(pair: tuple, **kw: object) -> P.PrincipalOverlapResult:
    opts: dict = {"k": K, "alpha": ALPHA, "svd": "exact", "precision": "fp64", "device": "cpu", "progress": False}
    return principal_overlap(str(pair[0]), str(pair[1]), **{**opts, **kw})


def test_update_on_principal_mask_overlaps_one_complement_zero(pair: tuple) -> None:
    df = run(pair).to_frame().set_index("tensor")
    size = math.floor(ALPHA * 48 * 32 + 0.5)
    up, q = df.loc[UP], df.loc[Q]
    assert up["overlap_principal"] == 1.0 and up["changed"] == up["principal_size"] == size
    assert up["ratio_principal"] == pytest.approx(1 / ALPHA)
    assert q["overlap_principal"] == 0.0 and q["changed"] == 48 * 32 - size
    assert up["k"] == K and up["svd"] == "exact" and bool(up["analysed"])
    assert up["energy_principal_random"] == pytest.approx(K * K / (48 * 32))
    down = df.loc[DOWN]
    assert down["changed"] == int(pair[3][DOWN].sum())
    # fp32 (the default) finds the same masks on these matrices
    df32 = run(pair, precision="fp32", svd="auto").to_frame().set_index("tensor")
    assert df32.loc[UP, "overlap_principal"] == 1.0 and df32.loc[Q, "overlap_principal"] == 0.0


def test_not_analysed_tensors_listed_with_reason(pair: tuple) -> None:
    r = run(pair)
    df = r.to_frame().set_index("tensor")
    assert list(r.to_frame().columns) == COLUMNS and set(REQUIRED) <= set(COLUMNS)
    norm, ids = df.loc["model.layers.0.input_layernorm.weight"], df.loc["position_ids"]
    assert not norm["analysed"] and "1-D" in norm["detail"] and pd.isna(norm["changed"])
    assert not ids["analysed"] and "not a float" in ids["detail"] and ids["status"] == "non_float"
    assert set(r.structural()["tensor"]) == {"model.layers.0.input_layernorm.weight", "position_ids"}
    assert int(r.overall()["tensors"]) == 3


def test_rollups_are_count_ratios(pair: tuple) -> None:
    r = run(pair)
    df = r.analysed().set_index("tensor")
    hits = df["changed_principal"].astype(float)
    changed = df["changed"].astype(float)
    o = r.overall()
    assert o["overlap_principal"] == pytest.approx(hits.sum() / changed.sum())
    expected = (changed * df["principal_size"].astype(float) / df["numel"].astype(float)).sum()
    assert o["ratio_principal"] == pytest.approx(hits.sum() / expected)
    matched = (changed * df["baseline_low_magnitude"].astype(float)).sum()
    assert o["ratio_low_magnitude"] == pytest.approx(df["changed_low"].astype(float).sum() / matched)
    energy = (df["energy_principal"] * df["delta_fro_sq"]).sum() / df["delta_fro_sq"].sum()
    assert o["energy_principal"] == pytest.approx(energy)
    layer0 = df.loc[[UP, DOWN]]
    by_layer = r.by("layer")
    assert by_layer.loc[0, "overlap_principal"] == pytest.approx(
        layer0["changed_principal"].astype(float).sum() / layer0["changed"].astype(float).sum()
    )
    assert by_layer.loc[1, "overlap_principal"] == 0.0
    assert r.by("module").loc["up", "overlap_principal"] == 1.0
    frame = r.to_frame()  # the `check` command's aggregates read the same frame and agree
    usable = frame[frame["analysed"].astype(bool)]
    for name in ("overlap_principal", "ratio_principal", "ratio_low_magnitude", "energy_principal"):
        assert METRICS[name].aggregate(usable) == pytest.approx(o[name]), name


def test_cli_csv_json_match_library(pair: tuple, tmp_path: Path) -> None:
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    args = ["principal-overlap", str(pair[0]), str(pair[1]), "--k", str(K), "--svd", "exact", "--precision", "fp64"]
    res = runner.invoke(app, [*args, "--device", "cpu", "--csv", str(out_csv), "--json", str(out_json), "-q"])
    assert res.exit_code == 0, res.output
    lib = run(pair).to_frame().set_index("tensor")
    csv = pd.read_csv(out_csv).set_index("tensor")
    assert set(REQUIRED) <= set(csv.columns) | {"tensor"}
    doc = json.loads(out_json.read_text())
    rows = {t["tensor"]: t for t in doc["tensors"]}
    for name in (UP, Q, DOWN):
        for col in ("changed", "changed_principal", "changed_low", "overlap_low", "ratio_low", "energy_principal"):
            expected = float(lib.at[name, col])  # type: ignore[arg-type]
            assert csv.at[name, col] == pytest.approx(expected, rel=1e-5)
            assert rows[name][col] == pytest.approx(expected, rel=1e-12)
    assert doc["header"]["k"] == str(K) and doc["header"]["precision"] == "fp64"
    assert doc["summary"][0].startswith("The update ")
    assert "magnitude-matched" in res.stdout


def test_save_masks_round_trip(pair: tuple, tmp_path: Path) -> None:
    path = tmp_path / "masks.safetensors"
    r = run(pair, save_masks=path)
    raw = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    shapes = json.loads(meta["shapes"])
    assert set(raw) == {f"{t}.{p}" for t in (UP, Q, DOWN) for p in ("principal", "low", "update")}
    assert shapes[DOWN] == [32, 48] and raw[f"{DOWN}.principal"].shape == (32, 6)
    size = math.floor(ALPHA * 48 * 32 + 0.5)
    base, planted = pair[2], pair[3]
    for name in (UP, Q, DOWN):
        m, n = shapes[name]
        parts = ("principal", "low", "update")
        unpack = {p: np.unpackbits(raw[f"{name}.{p}"], axis=-1, count=n).astype(bool) for p in parts}
        assert unpack["principal"].shape == (m, n) and unpack["principal"].sum() == unpack["low"].sum() == size
        assert np.array_equal(unpack["principal"].reshape(-1), ref_principal(base[name], K, ALPHA))
        assert np.array_equal(unpack["update"].reshape(-1), planted[name])
        low = base[name].float().abs().reshape(-1).numpy()
        assert unpack["low"].reshape(-1)[low < np.sort(low)[size - 1]].all()  # strictly below the threshold: in
    loaded = load_masks(path)
    row = r.to_frame().set_index("tensor").loc[DOWN]
    assert int((loaded[f"{DOWN}.principal"] & loaded[f"{DOWN}.update"]).sum()) == row["changed_principal"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_failure_leaves_no_mask_file(pair: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def boom(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = P.principal_metrics_with_masks
    monkeypatch.setattr(P, "principal_metrics_with_masks", boom)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError):
        run(pair, save_masks=out / "m.safetensors")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "word"),
    [("--alpha", "1.5", "--alpha"), ("--k", "0", "--k"), ("--svd", "fast", "--svd"), ("--precision", "bf16", "fp32")],
)
def test_bad_flags_exit_2_no_file(pair: tuple, tmp_path: Path, flag: str, value: str, word: str) -> None:
    out_csv, masks = tmp_path / "o.csv", tmp_path / "m.safetensors"
    args = ["principal-overlap", str(pair[0]), str(pair[1]), flag, value, "--csv", str(out_csv)]
    res = runner.invoke(app, [*args, "--save-masks", str(masks)])
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and word in res.stderr
    assert not out_csv.exists() and not masks.exists()


def test_batching_does_not_change_results(pair: tuple) -> None:
    one = run(pair, batch_budget=1e-9).to_frame()  # one matrix per batch
    many = run(pair).to_frame()
    pd.testing.assert_frame_equal(one, many)


def test_randomized_svd_agrees_with_exact_on_decaying_spectrum(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    m, n, k = 256, 128, 16
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -0.5  # slowly decaying, the hard case for sketching
    w0 = ((u * s) @ v.T + 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)).float()
    w1 = w0 + 1e-3 * torch.randn(m, n, generator=g)
    name = "model.layers.0.mlp.up_proj.weight"
    save_single({name: w0}, tmp_path / "b.safetensors")
    save_single({name: w1}, tmp_path / "f.safetensors")
    masks = {}
    for method in ("exact", "randomized"):
        path = tmp_path / f"{method}.safetensors"
        r = principal_overlap(
            str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"),
            k=k, svd=method, device="cpu", save_masks=path, progress=False,
        )  # fmt: skip
        assert r.to_frame()["svd"].iloc[0].startswith(method)
        masks[method] = load_masks(path)[f"{name}.principal"]
    agree = float((masks["exact"] == masks["randomized"]).double().mean())
    assert agree >= 0.99, agree
