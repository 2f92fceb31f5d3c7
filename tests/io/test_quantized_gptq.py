"""GPTQ and AWQ checkpoints (AutoGPTQ / GPTQModel / AutoAWQ names: ``qweight``, ``qzeros``, ``scales``, ``g_idx``),
built by construction with the packers written here from each format's definition:

- GPTQ: code of input i, output o in bits 4·(i mod 8) of ``qweight[i // 8, o]``; zero of (group, o) in bits
  4·(o mod 8) of ``qzeros[g, o // 8]``, stored minus one (checkpoint_format ``gptq``); W[o, i] = s[g(i), o] ·
  (q[i, o] − (zstored + 1)), g(i) = g_idx[i] (act-order) or i // group_size. "Minus one" is one 32-bit subtraction
  of 0x11111111 per word (GPTQModel), which is stored − 1 field by field only while no true zero is 0.
- AWQ (GEMM): ``qweight[i, o // 8]`` holds output columns 8k + [0, 2, 4, 6, 1, 3, 5, 7][f] in field f (AutoAWQ's
  pack order), ``qzeros`` alike; W[o, i] = s[i // gs, o] · (q[i, o] − z[i // gs, o]).

Expected values come from plain loops, never from ckptdiff's code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import save_single

import ckptdiff

P = "model.layers.0.mlp.up_proj"
IN, OUT, GS = 48, 16, 16
NG = IN // GS
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def gptq_pack(q: np.ndarray, zstored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qw = np.zeros((IN // 8, OUT), dtype=np.uint32)
    for i in range(IN):
        for o in range(OUT):
            qw[i // 8, o] |= np.uint32(int(q[i, o])) << np.uint32(4 * (i % 8))
    qz = np.zeros((zstored.shape[0], OUT // 8), dtype=np.uint32)
    for g in range(zstored.shape[0]):
        for o in range(OUT):
            qz[g, o // 8] |= np.uint32(int(zstored[g, o])) << np.uint32(4 * (o % 8))
    return qw.view(np.int32), qz.view(np.int32)


def awq_pack(m: np.ndarray) -> np.ndarray:
    rows = m.shape[0]
    out = np.zeros((rows, OUT // 8), dtype=np.uint32)
    for r in range(rows):
        for k in range(OUT // 8):
            for f in range(8):
                out[r, k] |= np.uint32(int(m[r, 8 * k + PACK_ORDER[f]])) << np.uint32(4 * f)
    return out.view(np.int32)


def values(q: np.ndarray, zero: np.ndarray, s: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(OUT, IN) float32: zero is the true zero point (GPTQ: stored + 1)."""
    out = np.zeros((OUT, IN), dtype=np.float32)
    for o in range(OUT):
        for i in range(IN):
            out[o, i] = np.float32(float(s[g[i], o]) * (float(q[i, o]) - float(zero[g[i], o])))
    return out


def save(folder: Path, sd: dict[str, np.ndarray], cfg: dict) -> Path:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    tensors["model.norm.weight"] = torch.ones(8, dtype=torch.float16)
    save_single(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": cfg}))
    return folder


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(7)
    q = rng.integers(0, 16, size=(IN, OUT)).astype(np.uint8)
    zs = rng.integers(5, 9, size=(NG, OUT)).astype(np.uint8)  # stored zeros (GPTQ: zero − 1)
    s = rng.uniform(0.01, 0.03, size=(NG, OUT)).astype(np.float16)
    g_idx = rng.permutation(np.repeat(np.arange(NG), GS)).astype(np.int32)  # act-order
    q[g_idx == 1, 3] = np.where(q[g_idx == 1, 3] == zs[1, 3] + 1, 0, q[g_idx == 1, 3])  # none at its zero point
    return {"q": q, "zs": zs, "s": s, "g_idx": g_idx}


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("tensor")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq(tmp_path: Path, data: dict, act_order: bool) -> None:
    cfg = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GS,
        "desc_act": act_order,
        "sym": False,
        "checkpoint_format": "gptq",
    }
    g = data["g_idx"] if act_order else (np.arange(IN) // GS).astype(np.int32)
    q1, zs1, s1 = data["q"].copy(), data["zs"].copy(), data["s"].copy()
    s1[1, 3] *= 2  # group 1 of output 3: its 16 inputs move
    q1[IN - 1, OUT - 1] ^= 1  # the last code of the last word
    zs1[2, 9] += 1  # a zero point: its group moves

    def save_gptq(folder: Path, q: np.ndarray, zs: np.ndarray, s: np.ndarray) -> Path:
        qw, qz = gptq_pack(q, zs)
        sd = {P + ".qweight": qw, P + ".qzeros": qz, P + ".scales": s, P + ".g_idx": g}
        return save(folder, sd, cfg)

    base, ft = save_gptq(tmp_path / "b", data["q"], data["zs"], data["s"]), save_gptq(tmp_path / "f", q1, zs1, s1)
    w0 = values(data["q"], data["zs"].astype(np.int64) + 1, data["s"], g)
    w1 = values(q1, zs1.astype(np.int64) + 1, s1, g)
    src = ckptdiff.open(base)
    assert set(src.infos) == {P + ".weight", "model.norm.weight"}
    assert src.infos[P + ".weight"].shape == (OUT, IN)
    np.testing.assert_array_equal(src.read_full(P + ".weight").numpy(), w0)
    src.close()
    row = _rows(ckptdiff.sparsity(base, ft, progress=False).to_frame()).loc[P + ".weight"]
    assert row["changed"] == np.count_nonzero(w0 != w1) and row["changed"] >= GS + 1
    assert row["codes_changed"] == 1 and row["scale_blocks_changed"] == 2
    assert row["dtype_base"] == "gptq-int4/g16" and bool(row["linear"])


def test_gptq_v2_zeros_are_not_offset(tmp_path: Path, data: dict) -> None:
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": GS, "desc_act": False, "checkpoint_format": "gptq_v2"}
    qw, qz = gptq_pack(data["q"], data["zs"])
    base = save(tmp_path / "b", {P + ".qweight": qw, P + ".qzeros": qz, P + ".scales": data["s"]}, cfg)
    g = (np.arange(IN) // GS).astype(np.int32)
    src = ckptdiff.open(base)
    np.testing.assert_array_equal(src.read_full(P + ".weight").numpy(), values(data["q"], data["zs"], data["s"], g))
    src.close()


def test_gptq_v1_zeros_are_one_word_subtraction(tmp_path: Path, data: dict) -> None:
    """A ``gptq`` (v1) qzeros word is the true zeros' word minus 0x11111111 as one 32-bit subtraction (GPTQModel's
    v2 -> v1 conversion, how it saves asymmetric checkpoints; its loader adds the constant back). A true zero of 0
    is then stored as 15 and borrows one from the next field, so the fields cannot be read one by one as
    stored + 1: here the true zeros (0 and 15 included) must come back exactly."""
    q, s = data["q"], data["s"]
    z = np.random.default_rng(11).integers(0, 16, size=(NG, OUT)).astype(np.int64)
    z[0, :4] = [0, 5, 0, 0]  # a borrow into a plain field, and a chain of borrows
    z[1, 7] = 0  # the top field of a word: its borrow leaves the word
    z[2, 8:16] = 15
    qw, qz_true = gptq_pack(q, z)
    words = [(int(w) - 0x11111111) % (1 << 32) for w in qz_true.view(np.uint32).reshape(-1)]
    qz = np.array(words, dtype=np.uint32).reshape(qz_true.shape).view(np.int32)
    g = (np.arange(IN) // GS).astype(np.int32)
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": GS, "sym": False, "checkpoint_format": "gptq"}
    base = save(tmp_path / "b", {P + ".qweight": qw, P + ".qzeros": qz, P + ".scales": s}, cfg)
    src = ckptdiff.open(base)
    np.testing.assert_array_equal(src.read_full(P + ".weight").numpy(), values(q, z, s, g))
    src.close()


def test_awq(tmp_path: Path, data: dict) -> None:
    cfg = {"quant_method": "awq", "bits": 4, "group_size": GS, "version": "gemm", "zero_point": True}
    z = data["zs"]
    q1, s1 = data["q"].copy(), data["s"].copy()
    q1[5, 2] ^= 4  # output column 2 sits in field 1 of its word: the interleave must be undone
    s1[0, 9] *= 2

    def save_awq(folder: Path, q: np.ndarray, s: np.ndarray) -> Path:
        sd = {P + ".qweight": awq_pack(q), P + ".qzeros": awq_pack(z), P + ".scales": s}
        return save(folder, sd, cfg)

    base, ft = save_awq(tmp_path / "b", data["q"], data["s"]), save_awq(tmp_path / "f", q1, s1)
    g = (np.arange(IN) // GS).astype(np.int32)
    w0, w1 = values(data["q"], z, data["s"], g), values(q1, z, s1, g)
    src = ckptdiff.open(base)
    np.testing.assert_array_equal(src.read_full(P + ".weight").numpy(), w0)
    src.close()
    row = _rows(ckptdiff.sparsity(base, ft, progress=False).to_frame()).loc[P + ".weight"]
    assert row["changed"] == np.count_nonzero(w0 != w1) > 1
    assert row["codes_changed"] == 1 and row["scale_blocks_changed"] == 1 and row["dtype_base"] == "awq-int4/g16"


def test_a_g_idx_naming_no_group_is_refused(tmp_path: Path, data: dict) -> None:
    from hostile import assert_refused

    cfg = {"quant_method": "gptq", "bits": 4, "group_size": GS, "desc_act": True, "checkpoint_format": "gptq"}
    qw, qz = gptq_pack(data["q"], data["zs"])
    bad = data["g_idx"].copy()
    bad[7] = NG  # one past the last group
    sd = {P + ".qweight": qw, P + ".qzeros": qz, P + ".scales": data["s"], P + ".g_idx": bad}
    base, ft = save(tmp_path / "b", sd, cfg), save(tmp_path / "f", sd, cfg)
    args = ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"]
    assert_refused(args, tmp_path, [".g_idx"], f"names group {NG}")


@pytest.mark.parametrize("bits", [2, 8])
def test_gptq_other_widths(tmp_path: Path, bits: int) -> None:
    """2- and 8-bit GPTQ: 32/bits codes per word, the same packing directions."""
    per = 32 // bits
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(IN, OUT)).astype(np.int64)
    zs = rng.integers(0, (1 << bits) - 1, size=(NG, OUT)).astype(np.int64)
    s = rng.uniform(0.01, 0.03, size=(NG, OUT)).astype(np.float16)
    qw = np.zeros((IN // per, OUT), dtype=np.uint32)
    for i in range(IN):
        for o in range(OUT):
            qw[i // per, o] |= np.uint32(int(q[i, o])) << np.uint32(bits * (i % per))
    qz = np.zeros((NG, OUT // per), dtype=np.uint32)
    for gi in range(NG):
        for o in range(OUT):
            qz[gi, o // per] |= np.uint32(int(zs[gi, o])) << np.uint32(bits * (o % per))
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": GS, "checkpoint_format": "gptq"}
    sd = {P + ".qweight": qw.view(np.int32), P + ".qzeros": qz.view(np.int32), P + ".scales": s}
    base = save(tmp_path / "b", sd, cfg)
    src = ckptdiff.open(base)
    want = values(q, zs + 1, s, (np.arange(IN) // GS).astype(np.int32))
    np.testing.assert_array_equal(src.read_full(P + ".weight").numpy(), want)
    assert src.infos[P + ".weight"].shape == (OUT, IN)
    src.close()
