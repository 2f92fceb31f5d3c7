"""MXFP4 expert tensors (gpt-oss layout: ``*_blocks`` U8 (E, R, G, 16) and ``*_scales`` U8 (E, R, G), quant_method
mxfp4), built by construction. The expected values come from a per-element loop over the OCP MXFP4 definition written
here (FP4 E2M1 table, low nibble first, scale 2^(e - 127) for every byte, 255 included, each expert the transpose
of its (R, 32·G) rows), never from ckptdiff's own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import save_single
from typer.testing import CliRunner

import ckptdiff
from ckptdiff.cli import app

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
NORM = "model.layers.0.input_layernorm.weight"
CONFIG = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []}}
E, R, G = 2, 6, 2  # experts, rows (2·intermediate for gate_up), 32-value groups per row -> hidden 64

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(E, 32·G, R) float32 by a plain loop: value k of block (e, r, g) is byte k // 2, low nibble for even k."""
    e_n, r_n, g_n, _ = blocks.shape
    out = np.zeros((e_n, g_n * 32, r_n), dtype=np.float32)
    for e in range(e_n):
        for r in range(r_n):
            for g in range(g_n):
                factor = 2.0 ** (int(scales[e, r, g]) - 127)
                for k in range(32):
                    byte = int(blocks[e, r, g, k // 2])
                    nib = byte & 0xF if k % 2 == 0 else byte >> 4
                    out[e, g * 32 + k, r] = np.float32(E2M1[nib] * factor)
    return out


def build() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(E, R, G, 16), dtype=np.uint8)
    # no zero codes in the block that gets re-scaled: all 32 of its values must move
    blocks[0, 2, 1] = rng.integers(1, 8, size=16, dtype=np.uint8) * 16 + rng.integers(1, 8, size=16, dtype=np.uint8)
    blocks[1, 0, 0, 3] = 0x70  # a +0 low nibble (value 7 of expert 1's block (0, 0)): the fine-tune stores −0
    scales = rng.integers(120, 130, size=(E, R, G), dtype=np.uint8)
    down_b = rng.integers(0, 256, size=(E, 64, 1, 16), dtype=np.uint8)  # hidden 64 rows, 32 inputs
    down_s = rng.integers(124, 128, size=(E, 64, 1), dtype=np.uint8)
    return {"gb": blocks, "gs": scales, "db": down_b, "ds": down_s}


def save(folder: Path, gb: np.ndarray, gs: np.ndarray, db: np.ndarray, ds: np.ndarray) -> Path:
    sd = {
        GATE_UP + "_blocks": torch.from_numpy(gb.copy()),
        GATE_UP + "_scales": torch.from_numpy(gs.copy()),
        DOWN + "_blocks": torch.from_numpy(db.copy()),
        DOWN + "_scales": torch.from_numpy(ds.copy()),
        GATE_UP + "_bias": torch.zeros(E, R, dtype=torch.bfloat16),
        NORM: torch.ones(64, dtype=torch.bfloat16),
    }
    save_single(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mxfp4")
    b = build()
    gb1, gs1 = b["gb"].copy(), b["gs"].copy()
    gs1[0, 2, 1] += 1  # scale-only change: the 32 values of expert 0, row 2, group 1 double
    old = int(gb1[1, 3, 0, 5])
    gb1[1, 3, 0, 5] = (old & 0xF0) | ((old & 0xF) ^ 0x1)  # code-only: one low nibble moves
    gb1[1, 0, 0, 3] = 0x78  # +0 -> −0 in the low nibble: no value changes
    return {
        "b": b,
        "gb1": gb1,
        "gs1": gs1,
        "base": save(root / "base", b["gb"], b["gs"], b["db"], b["ds"]),
        "ft": save(root / "ft", gb1, gs1, b["db"], b["ds"]),
    }


def test_experts_read_in_the_unquantized_name_and_shape(pair: dict) -> None:
    b = pair["b"]
    src = ckptdiff.open(pair["base"])
    names = set(src.infos)
    assert not any(n.endswith(("_blocks", "_scales")) for n in names)
    want = reference(b["gb"], b["gs"])
    for e in range(E):
        info = src.infos[f"{GATE_UP}[{e}]"]
        assert info.shape == (G * 32, R) and info.dtype.name == "F32"
        np.testing.assert_array_equal(src.read_full(f"{GATE_UP}[{e}]").numpy(), want[e])
    down = reference(b["db"], b["ds"])
    assert src.infos[f"{DOWN}[1]"].shape == (32, 64)
    np.testing.assert_array_equal(src.read_full(f"{DOWN}[1]").numpy(), down[1])
    # a range that crosses rows reads the same entries
    flat = want[1].reshape(-1)
    np.testing.assert_array_equal(src.read(f"{GATE_UP}[1]", 37, 100).numpy(), flat[37:137])
    src.close()


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("tensor")


def test_changed_counts_values_and_the_code_columns_count_storage(pair: dict) -> None:
    b = pair["b"]
    w0, w1 = reference(b["gb"], b["gs"]), reference(pair["gb1"], pair["gs1"])
    rows = _rows(ckptdiff.sparsity(pair["base"], pair["ft"], progress=False).to_frame())
    e0, e1 = rows.loc[f"{GATE_UP}[0]"], rows.loc[f"{GATE_UP}[1]"]
    assert e0["changed"] == np.count_nonzero(w0[0] != w1[0]) == 32  # the scale bump moves its whole block
    assert e0["codes_changed"] == 0 and e0["scale_blocks_changed"] == 1
    assert e1["changed"] == np.count_nonzero(w0[1] != w1[1]) == 1  # the −0 re-encoding counts nothing
    assert e1["codes_changed"] == 1 and e1["scale_blocks_changed"] == 0
    assert e0["numel"] == G * 32 * R and bool(e0["linear"])
    assert rows.loc[f"{DOWN}[0]", "changed"] == 0
    assert not any(t.endswith(("_blocks", "_scales")) for t in rows.index)
    assert rows.loc[f"{GATE_UP}[0]", "dtype_base"] == "mxfp4/32"


def test_an_mxfp4_base_pairs_with_its_bf16_fine_tune(pair: dict, tmp_path: Path) -> None:
    b = pair["b"]
    w = torch.from_numpy(reference(b["gb"], b["gs"]))
    d = torch.from_numpy(reference(b["db"], b["ds"]))
    ft = {
        GATE_UP: w.to(torch.bfloat16),
        DOWN: d.to(torch.bfloat16),
        GATE_UP + "_bias": torch.zeros(E, R, dtype=torch.bfloat16),
        NORM: torch.ones(64, dtype=torch.bfloat16),
    }
    assert torch.equal(ft[GATE_UP].float(), w)  # every E2M1 value times a power of two is a bf16 value
    ft[GATE_UP][1, 5, 2] += 1.0
    ft[GATE_UP][1, 60, 0] = -ft[GATE_UP][1, 60, 0] + 0.5
    path = save_single(ft, tmp_path / "ft" / "model.safetensors")
    rows = _rows(ckptdiff.sparsity(pair["base"], path, progress=False).to_frame())
    assert set(rows["status"]) <= {"ok", "dtype_changed"}, rows["status"].to_dict()
    assert rows.loc[f"{GATE_UP}[1]", "changed"] == 2 and rows.loc[f"{GATE_UP}[0]", "changed"] == 0
    assert rows.loc[f"{DOWN}[0]", "changed"] == 0


def test_spectral_and_principal_run_on_the_values(pair: dict, tmp_path: Path) -> None:
    b = pair["b"]
    fp32 = {}
    for tag, (gb, gs) in {"base": (b["gb"], b["gs"]), "ft": (pair["gb1"], pair["gs1"])}.items():
        sd = {
            GATE_UP: torch.from_numpy(reference(gb, gs)),
            DOWN: torch.from_numpy(reference(b["db"], b["ds"])),
            GATE_UP + "_bias": torch.zeros(E, R, dtype=torch.bfloat16),
            NORM: torch.ones(64, dtype=torch.bfloat16),
        }
        fp32[tag] = save_single(sd, tmp_path / tag / "model.safetensors")
    q = _rows(ckptdiff.spectral(pair["base"], pair["ft"], k=4, progress=False).to_frame())
    f = _rows(ckptdiff.spectral(fp32["base"], fp32["ft"], k=4, progress=False).to_frame())
    cols = ["nss", "sv_topk_max_rel_change", "delta_rel_fro", "delta_spectral_norm", "analysed"]
    assert q.loc[f"{GATE_UP}[0]", "delta_rel_fro"] > 0 and bool(q.loc[f"{GATE_UP}[0]", "analysed"])
    pd.testing.assert_frame_equal(q.loc[f.index, cols], f[cols], check_dtype=False)
    p = _rows(ckptdiff.principal_overlap(pair["base"], pair["ft"], k=4, svd="exact", progress=False).to_frame())
    p32 = _rows(ckptdiff.principal_overlap(fp32["base"], fp32["ft"], k=4, svd="exact", progress=False).to_frame())
    num = [c for c in p32.columns if p32[c].dtype.kind == "f"]
    assert num and bool(p.loc[f"{GATE_UP}[0]", "analysed"])
    pd.testing.assert_frame_equal(p.loc[p32.index, num], p32[num], check_dtype=False)


def test_scale_byte_255_is_two_to_the_128(tmp_path: Path) -> None:
    """The scale byte 255 reads as 2^128, as transformers' ``convert_moe_packed_tensors`` (``torch.ldexp``) gives
    it: each value is the exact code · 2^128 rounded once to fp32, so ±0 stays ±0, ±0.5 is ±2^127 and every larger
    code overflows to ±inf. (The OCP microscaling definition calls that byte NaN; the weights users load do not.)"""
    b = build()
    gb, gs = b["gb"].copy(), b["gs"].copy()
    gb[0, 1, 0, :8] = [0x10, 0x98, 0x09, 0x81, 0x72, 0xF0, 0x0F, 0x88]  # ±0, ±0.5, ±6 and the rest
    gs[0, 1, 0] = 255
    gs[1, 4, 1] = 254  # the largest finite scale: 2^127 (0.5 · 2^127 and 1 · 2^127 stay finite, 6 · 2^127 is inf)
    with np.errstate(over="ignore"):
        want = reference(gb, gs)
    src = ckptdiff.open(save(tmp_path, gb, gs, b["db"], b["ds"]))
    for e in range(E):
        got = src.read_full(f"{GATE_UP}[{e}]").numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want[e].view(np.uint32))  # bits: ±0 and ±inf included
    block = want[0][:32, 1]
    assert np.isinf(block).any() and not np.isnan(block).any() and np.float32(2.0**127) in np.abs(block)
    src.close()


def test_as_stored_compares_bytes_and_says_so(pair: dict) -> None:
    res = CliRunner().invoke(app, ["sparsity", str(pair["base"]), str(pair["ft"]), "--as-stored", "-q", "-f", "csv"])
    assert res.exit_code == 0, res.output
    assert "as stored" in res.stdout
    from io import StringIO

    df = pd.read_csv(StringIO(res.stdout), comment="#").set_index("tensor")
    assert f"{GATE_UP}_blocks[0]" in df.index or f"{GATE_UP}_blocks" in df.index
    raw = df.loc[[t for t in df.index if t.startswith(GATE_UP + "_blocks")]]
    assert raw["detail"].str.contains("as stored").all()


def test_small_chunks_count_what_whole_tensors_count(pair: dict) -> None:
    """Chunks of 37 entries cross rows of the transposed expert and experts of the stack: the same rows."""
    from ckptdiff.analyses.sparsity import SparsityAnalysis
    from ckptdiff.engine.alignment import align
    from ckptdiff.engine.pipeline import Run, execute

    def run(chunk: int) -> pd.DataFrame:
        views = [ckptdiff.open(pair["base"]), ckptdiff.open(pair["ft"])]
        r = Run(tuple(views), ("base", "ft"), tuple(align(views)), torch.device("cpu"), 2 * 1024**3, chunk_bytes=chunk)
        (res,) = execute(r, [SparsityAnalysis()], progress=False)
        for v in views:
            v.close()
        return res.to_frame()

    small = run(4 * 37)
    pd.testing.assert_frame_equal(small, run(4 * 60_000))
    assert _rows(small).loc[f"{GATE_UP}[0]", "changed"] == 32


def test_two_ranks_give_the_rows_of_one(pair: dict) -> None:
    """The code and scale counts travel with the totals when the experts are dealt to two ranks."""
    from factory import as_two_ranks

    from ckptdiff.analyses.sparsity import SparsityAnalysis
    from ckptdiff.engine.alignment import align
    from ckptdiff.engine.pipeline import Run, execute

    views = [ckptdiff.open(pair["base"]), ckptdiff.open(pair["ft"])]
    run = Run(tuple(views), ("base", "ft"), tuple(align(views, labels=["base", "ft"])), torch.device("cpu"), 2**31)
    (whole,) = execute(run, [SparsityAnalysis()], progress=False)
    (split,) = as_two_ranks(run, lambda: [SparsityAnalysis()])
    pd.testing.assert_frame_equal(whole.to_frame(), split.to_frame())
    rows = _rows(split.to_frame())
    assert rows.loc[f"{GATE_UP}[1]", "codes_changed"] == 1 and rows.loc[f"{GATE_UP}[0]", "scale_blocks_changed"] == 1
    for v in views:
        v.close()
