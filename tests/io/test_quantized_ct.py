"""compressed-tensors checkpoints (llm-compressor's W4A16 ``pack-quantized`` and FP8 ``float-quantized``), built by
construction: the packing and the expected values are written here from the format's definition (int4 codes stored
as q + 8, eight to an int32 word, the first column in the lowest bits; zero points packed the same way down the
rows; W = (q − z) · s), in plain per-element loops, never with ckptdiff's code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import save_single

import ckptdiff

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
OPROJ = "model.layers.0.self_attn.o_proj"
NORM = "model.layers.0.input_layernorm.weight"
OUT, IN, GS = 12, 40, 16  # 40 inputs in groups of 16: the last group has 8, the last word half a word of padding
NG = -(-IN // GS)


def ct_config(symmetric: bool) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GS}
    return {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        }
    }


def pack_rows(q: np.ndarray) -> np.ndarray:
    """Signed int4 (rows, cols) -> int32 (rows, ⌈cols/8⌉): column c in bits 4·(c mod 8) of word c // 8, as q + 8."""
    rows, cols = q.shape
    out = np.zeros((rows, -(-cols // 8)), dtype=np.uint32)
    for r in range(rows):
        for c in range(cols):
            out[r, c // 8] |= np.uint32((int(q[r, c]) + 8) & 0xF) << np.uint32(4 * (c % 8))
    return out.view(np.int32)


def _pack_down(z: np.ndarray) -> np.ndarray:
    rows, g = z.shape
    out = np.zeros((-(-rows // 8), g), dtype=np.uint32)
    for r in range(rows):
        for j in range(g):
            out[r // 8, j] |= np.uint32((int(z[r, j]) + 8) & 0xF) << np.uint32(4 * (r % 8))
    return out.view(np.int32)


def values(q: np.ndarray, s: np.ndarray, z: np.ndarray | None, g_idx: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros(q.shape, dtype=np.float32)
    for o in range(q.shape[0]):
        for j in range(q.shape[1]):
            g = int(g_idx[j]) if g_idx is not None else j // GS
            zero = float(z[o, g]) if z is not None else 0.0
            out[o, j] = np.float32((float(q[o, j]) - zero) * float(s[o, g]))
    return out


def build() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, size=(OUT, IN)).astype(np.int8)
    z = rng.integers(-3, 3, size=(OUT, NG)).astype(np.int8)
    s = rng.uniform(0.01, 0.05, size=(OUT, NG)).astype(np.float32)
    q[1, 0:GS] = np.where(q[1, 0:GS] == z[1, 0], z[1, 0] + 1, q[1, 0:GS])  # no entry at its zero point: all move
    q[4, GS : 2 * GS] = 2 * rng.integers(-4, 4, size=GS)  # even codes with an even zero point: re-encodable
    z[4, 1] = 2
    g_idx = rng.permutation(np.repeat(np.arange(NG), GS)[:IN]).astype(np.int32)  # act-order: groups scattered
    return {"q": q, "z": z, "s": s, "g_idx": g_idx}


def save(folder: Path, q: np.ndarray, z: np.ndarray, s: np.ndarray, g_idx: np.ndarray) -> Path:
    sd: dict[str, torch.Tensor] = {NORM: torch.ones(IN, dtype=torch.bfloat16)}
    for name, gi in ((Q, None), (K, g_idx)):
        sd[name + ".weight_packed"] = torch.from_numpy(pack_rows(q))
        sd[name + ".weight_scale"] = torch.from_numpy(s).to(torch.bfloat16).float()
        sd[name + ".weight_zero_point"] = torch.from_numpy(_pack_down(z))
        sd[name + ".weight_shape"] = torch.tensor([OUT, IN], dtype=torch.int64)
        if gi is not None:
            sd[name + ".weight_g_idx"] = torch.from_numpy(gi)
    save_single(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(ct_config(symmetric=False)))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ct")
    b = build()
    s = torch.from_numpy(b["s"]).to(torch.bfloat16).float().numpy()
    q1, z1, s1 = b["q"].copy(), b["z"].copy(), s.copy()
    s1[1, 0] *= 2  # scale only: the 16 weights of group (1, 0) move
    q1[2, 37] = q1[2, 37] + 1 if q1[2, 37] < 7 else 6  # one code in the last, partial group
    z1[3, 2] += 1  # a zero point: every weight of the partial group (3, 2) moves
    q1[4, GS : 2 * GS] //= 2  # codes and zero halved, scale doubled: the same values
    z1[4, 1] //= 2
    s1[4, 1] *= 2
    return {
        "b": b,
        "s": s,
        "q1": q1,
        "z1": z1,
        "s1": s1,
        "base": save(root / "base", b["q"], b["z"], s, b["g_idx"]),
        "ft": save(root / "ft", q1, z1, s1, b["g_idx"]),
    }


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("tensor")


def test_packed_weights_read_as_values(pair: dict) -> None:
    b = pair["b"]
    src = ckptdiff.open(pair["base"])
    assert {Q + ".weight", K + ".weight", NORM} == set(src.infos)
    np.testing.assert_array_equal(src.read_full(Q + ".weight").numpy(), values(b["q"], pair["s"], b["z"]))
    np.testing.assert_array_equal(src.read_full(K + ".weight").numpy(), values(b["q"], pair["s"], b["z"], b["g_idx"]))
    assert src.infos[Q + ".weight"].shape == (OUT, IN)
    src.close()


def test_counts_values_codes_and_groups(pair: dict) -> None:
    b = pair["b"]
    w0, w1 = values(b["q"], pair["s"], b["z"]), values(pair["q1"], pair["s1"], pair["z1"])
    res = ckptdiff.sparsity(pair["base"], pair["ft"], progress=False)
    rows = _rows(res.to_frame())
    row = rows.loc[Q + ".weight"]
    # the headline counts the two quantized linears at their logical size, the norm beside them, and no scale
    assert res.overall()["numel"] == 2 * OUT * IN + IN and res.linear_only()["numel"] == 2 * OUT * IN
    assert res.overall()["changed"] == rows["changed"].sum() > 0
    assert set(rows.index) == {Q + ".weight", K + ".weight", NORM}
    moved_zero = np.count_nonzero(w0[3, 2 * GS :] != w1[3, 2 * GS :])
    assert moved_zero == IN - 2 * GS  # the zero point moves all 8 weights of the partial group
    assert row["changed"] == np.count_nonzero(w0 != w1) == GS + 1 + moved_zero
    assert row["codes_changed"] == np.count_nonzero(b["q"] != pair["q1"]) and row["codes_changed"] > 1
    assert row["scale_blocks_changed"] == 3  # groups (1, 0), (3, 2) and (4, 1)
    assert row["numel"] == OUT * IN and bool(row["linear"]) and row["dtype_base"] == "int4/g16"
    g = b["g_idx"]
    k0, k1 = values(b["q"], pair["s"], b["z"], g), values(pair["q1"], pair["s1"], pair["z1"], g)
    assert rows.loc[K + ".weight", "changed"] == np.count_nonzero(k0 != k1)


def test_a_w4a16_release_pairs_with_its_bf16_source(pair: dict, tmp_path: Path) -> None:
    b = pair["b"]
    w = torch.from_numpy(values(b["q"], pair["s"], b["z"]))
    ft = {
        Q + ".weight": w.clone(),
        K + ".weight": torch.from_numpy(values(b["q"], pair["s"], b["z"], b["g_idx"])),
        NORM: torch.ones(IN, dtype=torch.bfloat16),
    }
    ft[Q + ".weight"][0, 0] += 1.0
    path = save_single(ft, tmp_path / "src" / "model.safetensors")
    rows = _rows(ckptdiff.sparsity(pair["base"], path, progress=False).to_frame())
    assert rows.loc[Q + ".weight", "changed"] == 1 and rows.loc[K + ".weight", "changed"] == 0
    assert (rows["status"] == "ok").all()


def test_a_config_whose_bits_contradict_the_tensors_is_refused(pair: dict, tmp_path: Path) -> None:
    cfg = ct_config(symmetric=False)
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in Path(pair["base"]).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps(cfg))
    from hostile import assert_refused

    line = assert_refused(
        ["sparsity", str(folder), str(pair["ft"]), "--csv", str(tmp_path / "out.csv")],
        tmp_path,
        ["_proj.weight_packed", "bad"],
        "num_bits",
    )
    assert "--as-stored" in line


# --- FP8 per channel and per tensor ---------------------------------------------------------------

E4M3 = torch.float8_e4m3fn


def fp8_values(codes: torch.Tensor, scale: np.ndarray) -> np.ndarray:
    c = codes.float().numpy()
    out = np.zeros(c.shape, dtype=np.float32)
    for o in range(c.shape[0]):
        for j in range(c.shape[1]):
            s = float(scale.reshape(-1)[0]) if scale.size == 1 else float(scale.reshape(-1)[o])
            out[o, j] = np.float32(float(c[o, j]) * s)
    return out


def test_fp8_per_channel_and_per_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    codes = (torch.rand(8, 24, generator=g) * 8 + 0.5).to(E4M3)  # no zero codes: a scale moves every entry
    codes[5, 3] = 0.0
    ch = np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(8, 1)
    ten = np.array([0.25], dtype=np.float32)
    cfg = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
            },
        }
    }

    def save_fp8(folder: Path, c: torch.Tensor, sch: np.ndarray, sten: np.ndarray) -> Path:
        sd = {
            V + ".weight": c,
            V + ".weight_scale": torch.from_numpy(sch),
            V + ".input_scale": torch.tensor([1.0]),
            OPROJ + ".weight": c.clone(),
            OPROJ + ".weight_scale": torch.from_numpy(sten),
        }
        save_single(sd, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    c1 = codes.clone()
    c1.view(torch.uint8)[5, 3] = 0x80  # +0 -> −0: no value change
    c1.view(torch.uint8)[6, 7] ^= 1  # one code
    ch1 = ch.copy()
    ch1[2] *= 2  # one channel: its 24 entries move
    ten1 = ten * 2  # the tensor scale: every non-zero entry moves
    base = save_fp8(tmp_path / "b", codes, ch, ten)
    ft = save_fp8(tmp_path / "f", c1, ch1, ten1)
    src = ckptdiff.open(base)
    assert set(src.infos) == {V + ".weight", OPROJ + ".weight"}
    np.testing.assert_array_equal(src.read_full(V + ".weight").numpy(), fp8_values(codes, ch))
    np.testing.assert_array_equal(src.read_full(OPROJ + ".weight").numpy(), fp8_values(codes, ten))
    src.close()
    rows = _rows(ckptdiff.sparsity(base, ft, progress=False).to_frame())
    v0, v1 = fp8_values(codes, ch), fp8_values(c1, ch1)
    assert rows.loc[V + ".weight", "changed"] == np.count_nonzero(v0 != v1) == 24 + 1
    assert rows.loc[V + ".weight", "codes_changed"] == 1 and rows.loc[V + ".weight", "scale_blocks_changed"] == 1
    o0, o1 = fp8_values(codes, ten), fp8_values(c1, ten1)
    assert rows.loc[OPROJ + ".weight", "changed"] == np.count_nonzero(o0 != o1) == 8 * 24 - 1
    assert rows.loc[OPROJ + ".weight", "dtype_base"] == "f8_e4m3/tensor"
    assert rows.loc[V + ".weight", "dtype_base"] == "f8_e4m3/channel"
    # principal-overlap sees the values: the same figures as the fp32 checkpoint of this test's formula
    p = {}
    for tag, (c, a, b) in {"b": (codes, ch, ten), "f": (c1, ch1, ten1)}.items():
        sd = {V + ".weight": torch.from_numpy(fp8_values(c, a)), OPROJ + ".weight": torch.from_numpy(fp8_values(c, b))}
        p[tag] = save_single(sd, tmp_path / f"{tag}32" / "model.safetensors")
    a = _rows(ckptdiff.principal_overlap(base, ft, k=4, svd="exact", progress=False).to_frame())
    w = _rows(ckptdiff.principal_overlap(p["b"], p["f"], k=4, svd="exact", progress=False).to_frame())
    num = [c for c in w.columns if w[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a.loc[w.index, num], w[num], check_dtype=False)


def test_consistency_check_and_as_bf16_see_the_values(pair: dict, tmp_path: Path) -> None:
    b = pair["b"]
    w0, w1 = values(b["q"], pair["s"], b["z"]), values(pair["q1"], pair["s1"], pair["z1"])
    # --as bf16: both sides rounded to bf16 first; the expected count rounds this test's own values
    r0 = torch.from_numpy(w0).to(torch.bfloat16).float().numpy()
    r1 = torch.from_numpy(w1).to(torch.bfloat16).float().numpy()
    rows = _rows(ckptdiff.sparsity(pair["base"], pair["ft"], as_dtype="bf16", progress=False).to_frame())
    assert rows.loc[Q + ".weight", "changed"] == np.count_nonzero(r0 != r1)
    # consistency across two fine-tunes: the second one identical to the first, so every changed entry agrees
    c = _rows(ckptdiff.consistency(pair["base"], [pair["ft"], pair["ft"]], progress=False).to_frame())
    row = c.loc[Q + ".weight"]
    n = np.count_nonzero(w0 != w1)
    assert row["n_a"] == row["n_b"] == row["n_both"] == n and row["jaccard"] == 1.0, row.to_dict()
    assert row["dtype_base"] == "int4/g16"
    # check gates on the dequantized count
    from ckptdiff.gate.check import check

    want = int(np.count_nonzero(w0 != w1))
    ok = check(pair["base"], pair["ft"], rules=[f"changed@{Q}.weight == {want}"], progress=False)
    bad = check(pair["base"], pair["ft"], rules=[f"changed@{Q}.weight == {want + 1}"], progress=False)
    assert ok.passed and not bad.passed


def test_an_unpacked_zero_point_is_one_integer_per_group(pair: dict, tmp_path: Path) -> None:
    b = pair["b"]
    sd = {
        Q + ".weight_packed": torch.from_numpy(pack_rows(b["q"])),
        Q + ".weight_scale": torch.from_numpy(pair["s"]),
        Q + ".weight_zero_point": torch.from_numpy(b["z"]),  # int8 (out, groups), as older releases wrote it
        Q + ".weight_shape": torch.tensor([OUT, IN], dtype=torch.int64),
    }
    save_single(sd, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(ct_config(symmetric=False)))
    src = ckptdiff.open(tmp_path / "m")
    np.testing.assert_array_equal(src.read_full(Q + ".weight").numpy(), values(b["q"], pair["s"], b["z"]))
    src.close()


def test_fp8_block_scales_and_int8_zero_points(tmp_path: Path) -> None:
    """FP8 with a block_structure [4, 8] (edge blocks partial) and naive int8 with a zero point per channel."""
    g = torch.Generator().manual_seed(4)
    codes = (torch.rand(10, 20, generator=g) * 6 + 0.5).to(E4M3)
    bs = np.random.default_rng(4).uniform(0.5, 2.0, size=(3, 3)).astype(np.float32)  # ⌈10/4⌉ x ⌈20/8⌉
    q8 = torch.randint(-100, 100, (10, 20), generator=g, dtype=torch.int8)
    s8 = np.linspace(0.01, 0.1, 10, dtype=np.float32).reshape(10, 1)
    z8 = np.arange(-5, 5, dtype=np.int8).reshape(10, 1)

    def block_ref(c: torch.Tensor, s: np.ndarray) -> np.ndarray:
        cf = c.float().numpy()
        out = np.zeros(cf.shape, dtype=np.float32)
        for i in range(cf.shape[0]):
            for j in range(cf.shape[1]):
                out[i, j] = np.float32(float(cf[i, j]) * float(s[i // 4, j // 8]))
        return out

    def zp_ref(q: torch.Tensor, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        qn = q.numpy()
        out = np.zeros(qn.shape, dtype=np.float32)
        for i in range(qn.shape[0]):
            for j in range(qn.shape[1]):
                out[i, j] = np.float32((float(qn[i, j]) - float(z[i, 0])) * float(s[i, 0]))
        return out

    def save_both(folder: Path, s: np.ndarray, z: np.ndarray) -> Path:
        sd = {V + ".weight": codes, V + ".weight_scale": torch.from_numpy(s),
              OPROJ + ".weight": q8, OPROJ + ".weight_scale": torch.from_numpy(s8),
              OPROJ + ".weight_zero_point": torch.from_numpy(z)}  # fmt: skip
        save_single(sd, folder / "model.safetensors")
        w = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [4, 8]}
        cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                       "config_groups": {"g": {"targets": ["Linear"], "weights": w}}}}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    bs1, z1 = bs.copy(), z8.copy()
    bs1[2, 2] *= 2  # the corner block, 2 x 4 entries
    z1[3, 0] += 1  # one channel's zero point: its 20 entries move
    base, ft = save_both(tmp_path / "b", bs, z8), save_both(tmp_path / "f", bs1, z1)
    src = ckptdiff.open(base)
    np.testing.assert_array_equal(src.read_full(V + ".weight").numpy(), block_ref(codes, bs))
    np.testing.assert_array_equal(src.read_full(OPROJ + ".weight").numpy(), zp_ref(q8, s8, z8))
    assert src.infos[V + ".weight"].shape == (10, 20)
    src.close()
    rows = _rows(ckptdiff.sparsity(base, ft, progress=False).to_frame())
    assert rows.loc[V + ".weight", "changed"] == np.count_nonzero(block_ref(codes, bs) != block_ref(codes, bs1)) == 8
    assert (
        rows.loc[V + ".weight", "dtype_base"] == "f8_e4m3/4x8" and rows.loc[V + ".weight", "scale_blocks_changed"] == 1
    )
    o0, o1 = zp_ref(q8, s8, z8), zp_ref(q8, s8, z1)
    assert rows.loc[OPROJ + ".weight", "changed"] == np.count_nonzero(o0 != o1) == 20
    assert (
        rows.loc[OPROJ + ".weight", "codes_changed"] == 0 and rows.loc[OPROJ + ".weight", "scale_blocks_changed"] == 1
    )
