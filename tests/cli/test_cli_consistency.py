"""`ckptdiff consistency` end to end (library and CliRunner) on checkpoints whose masks are planted."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import bump_ulps, llama_like, save_sharded, save_single
from typer.testing import CliRunner

from ckptdiff.analyses.consistency import COLUMNS, consistency, derive_labels
from ckptdiff.errors import InputError
from ckptdiff.metrics.mask import CompareMode

runner = CliRunner()
REQUIRED = [
    "tensor",
    "layer",
    "module",
    "run_a",
    "run_b",
    "density_a",
    "density_b",
    "jaccard",
    "jaccard_random",
    "jaccard_magnitude",
    "overlap_a",
    "overlap_b",
    "same_sign",
]

Plan = dict[str, torch.Tensor]  # tensor name -> flat indices changed


def _app():  # type: ignore[no-untyped-def]
    from ckptdiff.cli import app

    return app


def _save_run(base: dict[str, torch.Tensor], plan: Plan, path: Path, ulps: int = 1) -> Path:
    ft = {k: bump_ulps(v, plan[k], ulps) if k in plan else v.clone() for k, v in base.items()}
    return save_single(ft, path)


def _split(n: int, sizes: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Disjoint random index sets of the given sizes out of range(n)."""
    perm = torch.randperm(n, generator=gen)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return llama_like(layers=2, seed=1)


@pytest.fixture
def planted(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> tuple[Path, list[Path], dict[str, list[int]]]:
    """Three runs: a common set S in all, Y in runs 0 and 1 only, X_r in run r only; run 2 moves toward zero."""
    gen = torch.Generator().manual_seed(5)
    plans: list[Plan] = [{}, {}, {}]
    hist: dict[str, list[int]] = {}
    for k, v in base_sd.items():
        n = v.numel()
        sizes = [n // 8, n // 16, n // 10, n // 12, n // 20]  # S, Y, X0, X1, X2
        s, y, x0, x1, x2 = _split(n, sizes, gen)
        plans[0][k] = torch.cat([s, y, x0])
        plans[1][k] = torch.cat([s, y, x1])
        plans[2][k] = torch.cat([s, x2])
        hist[k] = [n - sum(sizes), sizes[2] + sizes[3] + sizes[4], sizes[1], sizes[0]]
    base = save_single(base_sd, tmp_path / "base" / "model.safetensors").parent
    runs = [
        _save_run(base_sd, p, tmp_path / f"run{r}" / "model.safetensors", 1 if r < 2 else -1)
        for r, p in enumerate(plans)
    ]
    return base, [r.parent for r in runs], hist


def test_identical_finetunes_give_jaccard_one(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(0)
    plan = {k: torch.randperm(v.numel(), generator=gen)[: 1 + v.numel() // 4] for k, v in base_sd.items()}
    base = save_single(base_sd, tmp_path / "base.safetensors")
    a = _save_run(base_sd, plan, tmp_path / "a" / "model.safetensors")
    b = _save_run(base_sd, plan, tmp_path / "b" / "model.safetensors")
    out = tmp_path / "o.csv"
    res = runner.invoke(_app(), ["consistency", str(base), str(a), str(b), "--csv", str(out), "-q"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert len(df) == len(base_sd)
    assert (df["jaccard"] == 1.0).all() and (df["overlap_a"] == 1.0).all() and (df["same_sign"] == 1.0).all()
    assert set(df["run_a"]) == {"a"} and set(df["run_b"]) == {"b"}
    assert "Mean off-diagonal Jaccard 1.0000" in " ".join(res.stdout.split())


def test_disjoint_masks_give_jaccard_zero(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(1)
    pa: Plan = {}
    pb: Plan = {}
    for k, v in base_sd.items():
        pa[k], pb[k] = _split(v.numel(), [v.numel() // 3, v.numel() // 5], gen)
    base = save_single(base_sd, tmp_path / "base.safetensors")
    a = _save_run(base_sd, pa, tmp_path / "a.safetensors")
    b = _save_run(base_sd, pb, tmp_path / "b.safetensors")
    r = consistency(str(base), [str(a), str(b)], progress=False)
    df = r.to_frame()
    assert (df["n_both"] == 0).all() and (df["jaccard"] == 0.0).all()
    assert df["same_sign"].isna().all()  # nothing changed in common: no division by zero
    o = r.overall_counts()
    assert o is not None and o.mean_jaccard == 0.0
    assert r.overall()["jaccard"] == 0.0 and r.overall()["numel"] == o.numel
    assert o.pair(0, 1).n_a == sum(len(x) for x in pa.values())
    assert r.labels == ("a", "b")


def test_planted_consensus_histogram(planted: tuple[Path, list[Path], dict[str, list[int]]], tmp_path: Path) -> None:
    base, runs, hist = planted
    r = consistency(str(base), [str(x) for x in runs], progress=False)
    per = {row["tensor"]: row for row in r.tensor_summary().to_dict(orient="records")}
    for k, h in hist.items():
        assert [per[k][f"consensus_{i}"] for i in range(4)] == h
    total = [sum(h[i] for h in hist.values()) for i in range(4)]
    assert r.consensus()["count"].tolist() == total
    o = r.overall_counts()
    assert o is not None and list(o.consensus) == total
    assert o.pair(0, 1).same_sign == 1.0  # both move away from zero
    assert o.pair(0, 2).same_sign == 0.0 and o.pair(1, 2).same_sign == 0.0  # run 2 moves toward zero

    out = tmp_path / "r.json"
    res = runner.invoke(_app(), ["consistency", str(base), *map(str, runs), "--json", str(out), "-f", "md", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    table = doc["tables"]["Consensus histogram: entries changed by exactly k runs"]
    assert [row["count"] for row in table] == total
    assert doc["labels"] == ["run0", "run1", "run2"]
    assert len(doc["per_tensor"]) == len(hist)
    assert res.stdout.startswith("## ckptdiff consistency")
    assert "magnitude-matched baseline" in doc["summary"][0]
    assert any("exceeds the magnitude-matched baseline" in s for s in doc["summary"])


def test_base_vs_itself_gives_empty_masks(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_single(base_sd, tmp_path / "base.safetensors")
    out_csv, out_json = tmp_path / "o.csv", tmp_path / "o.json"
    args = ["consistency", str(base), str(base), str(base), "--csv", str(out_csv), "--json", str(out_json), "-q"]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out_csv)
    assert (df["n_a"] == 0).all() and (df["n_b"] == 0).all() and (df["density_a"] == 0).all()
    assert df["jaccard"].isna().all() and df["jaccard_magnitude"].isna().all()
    assert set(df["run_a"]) == {"base"} and set(df["run_b"]) == {"base-2"}  # same input twice: numbered
    doc = json.loads(out_json.read_text())
    assert all(t["jaccard"] is None for t in doc["tensors"])
    assert "undefined" in doc["summary"][0]
    assert "undefined" in res.stdout


def test_labels_derived_and_overridden(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(2)
    plan = {k: torch.randperm(v.numel(), generator=gen)[:3] for k, v in base_sd.items()}
    base = save_single(base_sd, tmp_path / "base.safetensors")
    a = _save_run(base_sd, plan, tmp_path / "x" / "seed1" / "model.safetensors").parent
    b = _save_run(base_sd, plan, tmp_path / "seed2.safetensors")
    c = tmp_path / "y" / "seed1"
    save_sharded(dict(base_sd), c, [5, len(base_sd) - 5])
    assert derive_labels([str(a), str(b), str(c)]) == ["x/seed1", "seed2", "y/seed1"]
    assert derive_labels([str(a / "model.safetensors"), "org/model-7B@v2"]) == ["seed1", "model-7B"]
    assert derive_labels(["org/m@v1", "org/m@v2"]) == ["m@v1", "m@v2"]

    out = tmp_path / "o.json"
    res = runner.invoke(_app(), ["consistency", str(base), str(a), str(b), "--json", str(out), "-f", "json", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["labels"] == ["seed1", "seed2"]
    assert "ft_seed1" in doc["header"] and str(a) in doc["header"]["ft_seed1"]

    args = ["consistency", str(base), str(a), str(b), str(c), "-l", "A", "-l", "B", "--label", "C", "-f", "csv", "-q"]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split(",") == COLUMNS
    at = COLUMNS.index("run_a")
    pairs = {tuple(line.split(",")[at : at + 2]) for line in lines[1:]}
    assert pairs == {("A", "B"), ("A", "C"), ("B", "C")}


@pytest.mark.parametrize(
    "extra",
    [
        ["--label", "only-one"],
        ["--label", "same", "--label", "same"],
        ["--rtol", "1e-3", "--atol", "1e-5"],
        ["--device", "tpu"],
        ["--include", "nothing.*"],
    ],
)
def test_bad_input_exit_2_one_line_no_file(tmp_path: Path, base_sd: dict[str, torch.Tensor], extra: list[str]) -> None:
    base = save_single(base_sd, tmp_path / "base.safetensors")
    out_csv, out_json = tmp_path / "o.csv", tmp_path / "o.json"
    args = ["consistency", str(base), str(base), str(base), "--csv", str(out_csv), "--json", str(out_json), *extra]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error:")
    assert not out_csv.exists() and not out_json.exists()


def test_fewer_than_two_finetunes(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    base = save_single(base_sd, tmp_path / "base.safetensors")
    res = runner.invoke(_app(), ["consistency", str(base), str(base), "-q"])
    assert res.exit_code == 2
    assert "at least 2 fine-tuned" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(InputError, match="at least 2"):
        consistency(str(base), [str(base)], progress=False)
    with pytest.raises(InputError, match="got 3 labels value"):  # a library call names its keyword argument
        consistency(str(base), [str(base)] * 2, labels=["a", "b", "c"], progress=False)


def _texts(col: pd.Series) -> list[str]:
    return ["" if pd.isna(x) else str(x) for x in col]


def test_csv_columns_and_values_match_library(
    planted: tuple[Path, list[Path], dict[str, list[int]]], tmp_path: Path
) -> None:
    base, runs, _ = planted
    out = tmp_path / "o.csv"
    res = runner.invoke(_app(), ["consistency", str(base), *map(str, runs), "--csv", str(out), "-q"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(got.columns) == COLUMNS and set(REQUIRED) <= set(got.columns)
    lib = consistency(str(base), [str(x) for x in runs], progress=False).to_frame()
    assert len(got) == len(lib) == 3 * len(llama_like(layers=2))
    for col in COLUMNS:
        if not pd.api.types.is_numeric_dtype(lib[col]) or col == "linear":
            assert _texts(got[col]) == _texts(lib[col]), col
            continue
        expected = lib[col].astype("float64").to_numpy()
        torch.testing.assert_close(
            torch.tensor(got[col].astype("float64").to_numpy()),
            torch.tensor(expected),
            rtol=1e-5,
            atol=0,
            equal_nan=True,
        )
    assert got["run_a"].tolist() == lib["run_a"].tolist() and got["tensor"].tolist() == lib["tensor"].tolist()
    # the one-tensor random baseline is pq / (p + q - pq)
    p, q = got["density_a"], got["density_b"]
    assert ((got["jaccard_random"] - p * q / (p + q - p * q)).abs() < 1e-5).all()


def _bin(x: float) -> int | str:
    """floor(log2|x|), found independently of ckptdiff with math.frexp; zeros get their own bin."""
    if x == 0:
        return "zero"
    return math.frexp(x)[1] - 1  # x = m 2^e with 0.5 <= |m| < 1


def test_magnitude_baseline_matches_brute_force(tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    values = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 0.25, 0.3, 0.375, 0.0, -1.0]
    w0 = torch.tensor(values, dtype=torch.bfloat16).reshape(2, 6)
    a_idx, b_idx = [0, 1, 4, 7, 10], [1, 2, 5, 6, 8, 11]
    base = save_single({name: w0}, tmp_path / "base.safetensors")
    a = _save_run({name: w0}, {name: torch.tensor(a_idx)}, tmp_path / "a.safetensors")
    b = _save_run({name: w0}, {name: torch.tensor(b_idx)}, tmp_path / "b.safetensors")
    out = tmp_path / "o.csv"
    res = runner.invoke(_app(), ["consistency", str(base), str(a), str(b), "--csv", str(out), "-q"])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(out).iloc[0]

    # Brute force: every placement of A's entries that keeps its count in each bin, B held fixed.
    bins: dict[int | str, list[int]] = {}
    for i, x in enumerate(w0.float().reshape(-1).tolist()):
        bins.setdefault(_bin(x), []).append(i)
    assert len(bins) == 4
    per_bin = [itertools.combinations(ix, sum(i in a_idx for i in ix)) for ix in bins.values()]
    total, count = Fraction(0), 0
    for placement in itertools.product(*per_bin):
        chosen = {i for part in placement for i in part}
        total += len(chosen & set(b_idx))
        count += 1
    expected = total / count
    j_mag = float(expected / (len(a_idx) + len(b_idx) - expected))
    assert row["expected_magnitude"] == pytest.approx(float(expected), rel=1e-5)
    assert row["jaccard_magnitude"] == pytest.approx(j_mag, rel=1e-5)
    assert row["jaccard"] == pytest.approx(1 / 10)  # |A∩B| = 1, |A∪B| = 10
    assert int(row["n_both"]) == 1


def test_random_masks_near_random_baseline(tmp_path: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(200, 200, generator=gen).to(torch.bfloat16)
    n = w0.numel()
    a = torch.nonzero(torch.rand(n, generator=gen) < 0.3).reshape(-1)
    b = torch.nonzero(torch.rand(n, generator=gen) < 0.1).reshape(-1)
    base = save_single({name: w0}, tmp_path / "base.safetensors")
    fa = _save_run({name: w0}, {name: a}, tmp_path / "a.safetensors")
    fb = _save_run({name: w0}, {name: b}, tmp_path / "b.safetensors")
    o = consistency(str(base), [str(fa), str(fb)], mode=CompareMode("rtol", 1e-3), progress=False).overall_counts()
    assert o is not None
    pair = o.pair(0, 1)
    p, q = pair.density_a, pair.density_b
    assert pair.jaccard_random == pytest.approx(p * q / (p + q - p * q))
    assert abs(pair.jaccard - pair.jaccard_random) < 0.015  # sd of J is about 0.002 at n = 40,000
    assert abs(pair.jaccard_magnitude - pair.jaccard_random) < 0.015  # uniform placement: bins do not matter


def test_structural_findings(tmp_path: Path, base_sd: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(4)
    plan = {k: torch.randperm(v.numel(), generator=gen)[:5] for k, v in base_sd.items()}
    base = dict(base_sd)
    base["position_ids"] = torch.arange(8)
    runs = []
    for r in range(3):
        ft = {k: bump_ulps(v, plan[k]) for k, v in base_sd.items()}
        ft["position_ids"] = torch.arange(8)
        if r == 1:
            del ft["lm_head.weight"]
            ft["model.norm.weight"] = torch.ones(4, dtype=torch.bfloat16)
        if r == 2:
            ft["model.layers.0.mlp.up_proj.weight"] = ft["model.layers.0.mlp.up_proj.weight"].float()
        runs.append(save_single(ft, tmp_path / f"r{r}.safetensors"))
    b = save_single(base, tmp_path / "base.safetensors")
    res = consistency(str(b), [str(x) for x in runs], progress=False)
    st = {row["tensor"]: row for row in res.structural().to_dict(orient="records")}
    assert st["lm_head.weight"]["status"] == "missing" and "r1" in str(st["lm_head.weight"]["detail"])
    assert st["model.norm.weight"]["status"] == "shape_mismatch"
    assert st["position_ids"]["status"] == "non_float"
    assert st["model.layers.0.mlp.up_proj.weight"]["status"] == "dtype_changed"
    compared = {t.item["tensor"] for t in res.compared()}
    assert "model.layers.0.mlp.up_proj.weight" in compared
    assert not {"lm_head.weight", "model.norm.weight", "position_ids"} & compared
    rows = {(x["tensor"], x["run_a"], x["run_b"]): x for x in res.to_frame().to_dict(orient="records")}
    up = rows[("model.layers.0.mlp.up_proj.weight", "r0", "r2")]
    assert up["compared_as"] == "bf16" and up["jaccard"] == 1.0  # fp32 copy of bf16 values: same mask
    assert math.isnan(float(rows[("lm_head.weight", "r0", "r1")]["jaccard"]))
