"""`ckptdiff spectral` end to end through typer's CliRunner, on checkpoints whose spectra are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import save_single
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from ckptdiff.analyses.spectral import FP32_WARNING, NULL_COLUMNS, columns, spectral
from ckptdiff.cli import app
from ckptdiff.gate import METRICS

runner = CliRunner()
M, N, K = 40, 24, 4
THETA = 7.5  # degrees
SCALE = 1.5
ROT = "model.layers.0.self_attn.q_proj.weight"  # top-k left subspace rotated by THETA
SCALED = "model.layers.0.mlp.up_proj.weight"  # W1 = SCALE * W0
NOISY = "model.layers.1.mlp.down_proj.weight"  # small random update
NORM = "model.layers.0.input_layernorm.weight"
POS = "model.position_ids"
MATRICES = [ROT, SCALED, NOISY]
CSV_COLUMNS = [
    "tensor",
    "layer",
    "module",
    "shape",
    "k",
    "nss",
    "sv_topk_max_rel_change",
    "angle_u_max_deg",
    "angle_v_max_deg",
    "angle_u_mean_deg",
    "angle_v_mean_deg",
    "gap_k",
    "delta_spectral_norm",
    "delta_rel_fro",
    "delta_stable_rank",
    "nss_per_update",
    "status",
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(m: int, p: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, p, generator=gen(seed), dtype=torch.float64))[0]  # (m, p)


def spectrum() -> torch.Tensor:
    """σ(W0) of the rotated matrix: a wide gap after the top K, so its Wedin bound (about 15°) is informative and
    the angle counts as a measurement (declarations.WEDIN_UNSTABLE_DEG)."""
    top = torch.tensor([10.0, 9.0, 8.0, 7.0], dtype=torch.float64)[:K]
    return torch.cat([top, torch.linspace(2.0, 1.0, N - K, dtype=torch.float64)])


def rotated_pair(theta_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 = U diag(s) Vᵀ and W1 with u_1 turned by theta towards u_{K+1} (outside the top K): one principal angle θ."""
    s = spectrum()
    u, v = orthonormal(M, N, 1), orthonormal(N, N, 2)  # (M, N), (N, N)
    t = math.radians(theta_deg)
    u1 = u.clone()
    u1[:, 0] = math.cos(t) * u[:, 0] + math.sin(t) * u[:, K]
    u1[:, K] = -math.sin(t) * u[:, 0] + math.cos(t) * u[:, K]
    return (u * s) @ v.T, (u1 * s) @ v.T  # (M, N) each


def build() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fp64 base and fine-tune (fp64 storage: no bf16 rounding spoils the constructed answers)."""
    w0_rot, w1_rot = rotated_pair(THETA)
    w0_sc = torch.randn(M, N, generator=gen(3), dtype=torch.float64)
    w0_no = torch.randn(N, M, generator=gen(4), dtype=torch.float64)
    base = {
        ROT: w0_rot,
        SCALED: w0_sc,
        NOISY: w0_no,
        NORM: torch.ones(N, dtype=torch.float64),
        POS: torch.arange(7),
    }
    ft = dict(base)
    ft[ROT] = w1_rot
    ft[SCALED] = SCALE * w0_sc
    ft[NOISY] = w0_no + 1e-3 * torch.randn(N, M, generator=gen(5), dtype=torch.float64)
    ft[NORM] = base[NORM] + 0.01
    return base, ft


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base, ft = build()
    return save_single(base, tmp_path / "base.safetensors"), save_single(ft, tmp_path / "ft.safetensors")


def invoke(*args: object) -> object:
    return runner.invoke(app, ["spectral", *(str(a) for a in args)])


def test_known_answers_through_the_cli(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    res = invoke(*pair, "--k", K, "--csv", out, "-q")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    df = pd.read_csv(out).set_index("tensor")
    assert set(CSV_COLUMNS) - {"tensor"} <= set(df.columns)
    assert not set(NULL_COLUMNS) & set(df.columns)
    rot, sc = df.loc[ROT], df.loc[SCALED]
    assert rot["angle_u_max_deg"] == pytest.approx(THETA, rel=1e-5)  # CSV keeps 6 significant digits
    assert rot["angle_u_mean_deg"] == pytest.approx(THETA / K, rel=1e-5)
    assert rot["angle_v_max_deg"] < 1e-6 and rot["nss"] < 1e-12
    assert rot["k"] == K and rot["shape"] == f"{M}x{N}" and rot["module"] == "q" and rot["layer"] == 0
    assert sc["nss"] == pytest.approx(SCALE - 1, rel=1e-5)
    assert sc["sv_topk_max_rel_change"] == pytest.approx(SCALE - 1, rel=1e-5)
    assert sc["nss_per_update"] == pytest.approx(1.0, rel=1e-5)
    assert sc["delta_stable_rank"] == pytest.approx(_stable_rank(build()[0][SCALED]), rel=1e-5)
    for col in ("angle_u_max_deg", "angle_v_max_deg", "angle_u_mean_deg", "angle_v_mean_deg"):
        assert sc[col] < 1e-5
    s = spectrum()
    assert rot["gap_k"] == pytest.approx(float(s[K - 1] - s[K]), rel=1e-5)
    assert rot["wedin_bound_deg"] < 45 and rot["angles"] == "ok"


def _stable_rank(w0: torch.Tensor) -> float:
    """Stable rank of ΔW = (SCALE-1)·W0 is that of W0: ‖W0‖_F² / ‖W0‖₂²."""
    sv = torch.linalg.svdvals(w0)
    return float((sv**2).sum() / sv[0] ** 2)


def test_not_analysed_tensors_are_listed(pair: tuple[Path, Path]) -> None:
    r = spectral(*map(str, pair), k=K, progress=False)
    df = r.to_frame().set_index("tensor")
    assert list(r.analysed()["tensor"]) == [SCALED, ROT, NOISY]  # natural name order
    for name, word in ((NORM, "1-D"), (POS, "integer")):
        assert not df["analysed"][name] and math.isnan(float(df["nss"][name]))
        assert word in str(df["detail"][name])
    assert set(r.structural()["tensor"]) == {NORM, POS}
    assert df.loc[POS, "status"] == "non_float"


def test_null_is_finite_and_seeded(pair: tuple[Path, Path]) -> None:
    base, ft = map(str, pair)
    a = spectral(base, ft, k=K, null="random", seed=0, progress=False).analysed()
    b = spectral(base, ft, k=K, null="random", seed=0, progress=False).analysed()
    c = spectral(base, ft, k=K, null="random", seed=1, progress=False).analysed()
    for col in ("nss_null", "angle_u_max_deg_null", "angle_v_max_deg_null"):
        assert np.isfinite(a[col].to_numpy()).all()
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
        assert not np.array_equal(a[col].to_numpy(), c[col].to_numpy())
    np.testing.assert_allclose(a["nss_null_ratio"], a["nss"] / a["nss_null"], rtol=1e-12)
    # The equal-norm null of a pure rescaling changes the spectrum by less than the rescaling itself.
    assert float(a.set_index("tensor")["nss_null_ratio"][SCALED]) > 1


def test_csv_and_json_equal_the_library(pair: tuple[Path, Path], tmp_path: Path) -> None:
    csv, js = tmp_path / "s.csv", tmp_path / "s.json"
    res = invoke(*pair, "--k", K, "--null", "random", "--seed", 3, "--csv", csv, "--json", js, "-f", "md", "-q")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert res.stdout.startswith("## ckptdiff spectral")  # type: ignore[attr-defined]
    lib = spectral(*map(str, pair), k=K, null="random", seed=3, progress=False).to_frame()
    got = pd.read_csv(csv)
    assert list(got.columns) == columns(True) == list(lib.columns)
    num = [c for c in lib.columns if lib[c].dtype.kind == "f"]
    np.testing.assert_allclose(got[num].to_numpy(float), lib[num].to_numpy(float), rtol=1e-5, equal_nan=True)
    doc = json.loads(js.read_text())
    assert doc["header"]["null"] == "random" and doc["header"]["seed"] == "3" and doc["header"]["precision"] == "fp64"
    rows = pd.DataFrame(doc["tensors"])
    assert list(rows["tensor"]) == list(lib["tensor"])
    np.testing.assert_allclose(rows[num].to_numpy(float), lib[num].to_numpy(float), rtol=1e-12, equal_nan=True)
    assert "Per layer" in doc["tables"] and "Per module type" in doc["tables"]


def test_save_spectra_matches_numpy(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "spectra.safetensors"
    res = invoke(*pair, "--k", K, "--save-spectra", out, "-f", "csv", "-q")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    base, ft = build()
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {f"{t}.sigma_{side}" for t in MATRICES for side in ("base", "ft")}
        assert f.metadata()["analysis"] == "spectral"
        for name in MATRICES:
            for side, sd in (("base", base), ("ft", ft)):
                got = f.get_tensor(f"{name}.sigma_{side}")
                assert got.dtype == torch.float64
                want = np.linalg.svd(sd[name].numpy(), compute_uv=False)
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_fp32_warns_and_records_it(pair: tuple[Path, Path], tmp_path: Path) -> None:
    js = tmp_path / "s.json"
    res = invoke(*pair, "--k", K, "--precision", "fp32", "--json", js, "-f", "csv", "-q")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    lines = res.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert lines == [f"ckptdiff: warning: {FP32_WARNING}"]
    head = json.loads(js.read_text())["header"]
    assert head["precision"] == "fp32" and head["warning"] == FP32_WARNING
    quiet = invoke(*pair, "--k", K, "-f", "csv", "-q")
    assert quiet.stderr == ""  # type: ignore[attr-defined]


def test_as_bf16_rounds_both_sides_first(tmp_path: Path) -> None:
    """An update below bf16's half-ULP disappears with --as bf16: zero drift; natively it is seen."""
    w0 = torch.randn(M, N, generator=gen(6)).to(torch.bfloat16).to(torch.float32)
    w1 = w0 * (1 + 2**-12)  # relative step far below bf16's 2^-9 half-ULP: rounds back to w0
    b = save_single({ROT: w0}, tmp_path / "b.safetensors")
    f = save_single({ROT: w1}, tmp_path / "f.safetensors")
    native = spectral(str(b), str(f), k=K, progress=False).analysed().iloc[0]
    as_bf16 = spectral(str(b), str(f), k=K, as_dtype="bf16", progress=False)
    row = as_bf16.analysed().iloc[0]
    assert native["nss"] == pytest.approx(2**-12, rel=1e-6) and native["compared_as"] == "fp32"
    assert row["nss"] == 0 and row["angle_u_max_deg"] < 1e-9 and row["compared_as"] == "bf16"
    assert as_bf16.header["as"] == "bf16"


def test_batching_does_not_change_results(pair: tuple[Path, Path]) -> None:
    base, ft = map(str, pair)
    whole = spectral(base, ft, k=K, null="random", progress=False).to_frame()
    one_by_one = spectral(base, ft, k=K, null="random", batch_budget=1e-9, progress=False).to_frame()
    num = [c for c in whole.columns if whole[c].dtype.kind == "f"]
    np.testing.assert_allclose(whole[num].to_numpy(float), one_by_one[num].to_numpy(float), rtol=1e-9, equal_nan=True)


def test_rollups_are_max_median_and_weighted(pair: tuple[Path, Path]) -> None:
    r = spectral(*map(str, pair), k=K, progress=False)
    df = r.analysed().set_index("tensor")
    layer0 = df.loc[[ROT, SCALED]]
    row = r.by("layer").loc[0]
    assert row["matrices"] == 2 and row["nss_max"] == pytest.approx(SCALE - 1, rel=1e-9)
    assert row["nss_median"] == pytest.approx(float(layer0["nss"].median()))
    assert row["angle_u_deg_max"] == pytest.approx(THETA, rel=1e-9)
    w = layer0["numel"].astype(float)
    assert row["nss_per_update"] == pytest.approx(float((layer0["nss_per_update"] * w).sum() / w.sum()))
    assert r.by("module").loc["q", "angle_u_deg_median"] == pytest.approx(THETA, rel=1e-9)
    text = " ".join(r.report().summary)
    assert "Layers that rotate most: layer 0" in text


def test_null_summary_and_check_columns(pair: tuple[Path, Path]) -> None:
    r = spectral(*map(str, pair), k=K, null=True, progress=False)  # the check command passes null=True
    frame = r.to_frame()
    for spec in METRICS.values():
        if spec.analysis == "spectral":
            assert set(spec.needs) <= set(frame.columns), spec.name
    assert "status" in frame.columns
    assert any("equal-norm random null" in s for s in r.report().summary)


@pytest.mark.parametrize(
    "args",
    [
        ["--k", "0"],
        ["--null", "foo"],
        ["--precision", "fp16"],
        ["--as", "int8"],
        ["--batch-budget", "0"],
    ],
)
def test_bad_flags_exit_2_and_write_nothing(pair: tuple[Path, Path], tmp_path: Path, args: list[str]) -> None:
    csv, spectra = tmp_path / "bad.csv", tmp_path / "bad.safetensors"
    res = invoke(*pair, *args, "--csv", csv, "--save-spectra", spectra, "-q")
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    assert not csv.exists() and not spectra.exists()


def test_library_rejects_bad_values(pair: tuple[Path, Path]) -> None:
    from ckptdiff.errors import InputError

    for kwargs in ({"k": 0}, {"precision": "bf16"}, {"null": "gaussian"}, {"batch_budget": -1.0}):
        with pytest.raises(InputError):
            spectral(*map(str, pair), progress=False, **kwargs)  # type: ignore[arg-type]


def test_table_output_and_help(pair: tuple[Path, Path]) -> None:
    res = invoke(*pair, "--k", K, "-q")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert "Spectral drift over 3 matrices" in res.stdout  # type: ignore[attr-defined]
    help_ = runner.invoke(app, ["spectral", "--help"])
    assert help_.exit_code == 0 and "Example" in help_.stdout


def _write_pair(tmp_path: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> tuple[str, str]:
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(ft, str(tmp_path / "f.safetensors"))
    return str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors")


def test_spectral_of_fp32_matrix_unchanged_by_a_bf16_neighbour(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    b0 = torch.randn(32, 16, generator=g)
    b1 = b0 + 1e-4 * torch.randn(32, 16, generator=g)
    a0 = torch.randn(32, 16, generator=g).bfloat16()
    alone = spectral(*_write_pair(tmp_path, {"m.b": b0}, {"m.b": b1}), k=4, progress=False, device="cpu").to_frame()
    (tmp_path / "2").mkdir()
    both = spectral(
        *_write_pair(tmp_path / "2", {"m.a": a0, "m.b": b0}, {"m.a": a0, "m.b": b1}), k=4, progress=False, device="cpu"
    ).to_frame()
    nss_alone = float(alone.set_index("tensor").loc["m.b", "nss"])
    nss_both = float(both.set_index("tensor").loc["m.b", "nss"])
    assert nss_both == pytest.approx(nss_alone, rel=1e-9)
