"""bitsandbytes checkpoints as transformers saves them (4-bit NF4/FP4 with ``absmax``, ``quant_map``, the packed
``quant_state.bitsandbytes__*`` JSON, and the nested variant; LLM.int8 with ``SCB`` and ``weight_format``), built by
construction. Expected values come from plain loops over bitsandbytes' definition written here: the flattened weight
in blocks of ``blocksize``, two codes per byte with the first in the high nibble, value = quant_map[code] ·
absmax[block]; nested absmax = nested_quant_map[a] · nested_absmax[b // nested_blocksize] + offset in fp32;
LLM.int8 value = q · SCB[row] / 127."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import save_single

import ckptdiff

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
OUT, IN, BS, NBS = 6, 20, 16, 4  # 120 entries: 8 blocks of 16 (the last holds 8); nested blocks of 4 absmax
NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
FP4 = [
    0.0,
    0.0052083333,
    0.6666667,
    1.0,
    0.33333334,
    0.5,
    0.16666667,
    0.25,
    -0.0,
    -0.0052083333,
    -0.6666667,
    -1.0,
    -0.33333334,
    -0.5,
    -0.16666667,
    -0.25,
]
N = OUT * IN
NB = -(-N // BS)


def pack(codes: np.ndarray) -> np.ndarray:
    out = np.zeros((-(-codes.size // 2), 1), dtype=np.uint8)
    for k, c in enumerate(codes.reshape(-1)):
        out[k // 2, 0] |= (int(c) << 4) if k % 2 == 0 else int(c)
    return out


def values4(codes: np.ndarray, qmap: list[float], absmax: np.ndarray) -> np.ndarray:
    out = np.zeros(codes.size, dtype=np.float32)
    for k, c in enumerate(codes.reshape(-1)):
        out[k] = np.float32(float(np.float32(qmap[int(c)])) * float(absmax[k // BS]))
    return out.reshape(OUT, IN)


def nested_absmax(a: np.ndarray, nmap: np.ndarray, outer: np.ndarray, offset: float) -> np.ndarray:
    out = np.zeros(a.size, dtype=np.float32)
    for b in range(a.size):
        out[b] = np.float32(np.float32(nmap[int(a[b])]) * np.float32(outer[b // NBS])) + np.float32(offset)
    return out


def state(qtype: str, nested: bool) -> torch.Tensor:
    d = {"quant_type": qtype, "blocksize": BS, "dtype": "bfloat16", "shape": [OUT, IN]}
    if nested:
        d.update({"nested_blocksize": NBS, "nested_dtype": "float32", "nested_offset": 0.03125})
    return torch.frombuffer(bytearray(json.dumps(d).encode()), dtype=torch.uint8)


def save(
    folder: Path, qc: np.ndarray, qabs: np.ndarray, kc: np.ndarray, ka: np.ndarray, nmap: np.ndarray, outer: np.ndarray
) -> Path:
    sd = {
        Q: torch.from_numpy(pack(qc)),
        Q + ".absmax": torch.from_numpy(qabs),
        Q + ".quant_map": torch.tensor(NF4, dtype=torch.float32),
        Q + ".quant_state.bitsandbytes__nf4": state("nf4", nested=False),
        K: torch.from_numpy(pack(kc)),
        K + ".absmax": torch.from_numpy(ka),
        K + ".quant_map": torch.tensor(FP4, dtype=torch.float32),
        K + ".nested_absmax": torch.from_numpy(outer),
        K + ".nested_quant_map": torch.from_numpy(nmap),
        K + ".quant_state.bitsandbytes__fp4": state("fp4", nested=True),
    }
    save_single(sd, folder / "model.safetensors")
    cfg = {
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
        }
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bnb")
    rng = np.random.default_rng(2)
    qc = rng.integers(0, 16, size=N).astype(np.uint8)
    qc[BS : 2 * BS] = np.where(qc[BS : 2 * BS] == 7, 8, qc[BS : 2 * BS])  # block 1 has no zero code
    qabs = rng.uniform(0.5, 2.0, size=NB).astype(np.float32)
    kc = rng.integers(1, 8, size=N).astype(np.uint8)  # fp4: no ±0 codes...
    kc[3] = 0  # ...but one +0
    ka = rng.integers(0, 256, size=NB).astype(np.uint8)
    nmap = np.sort(rng.uniform(-1, 1, size=256)).astype(np.float32)
    outer = rng.uniform(0.5, 2.0, size=-(-NB // NBS)).astype(np.float32)
    b = {"qc": qc, "qabs": qabs, "kc": kc, "ka": ka, "nmap": nmap, "outer": outer}
    f = {k: v.copy() for k, v in b.items()}
    f["qabs"][1] *= 1.5  # absmax of block 1: its 16 weights move
    f["qc"][NB * BS - 1 - 8] ^= 0x3  # one code in the last, partial block
    f["kc"][3] = 8  # fp4 +0 -> −0: nothing moves
    f["outer"][1] *= 2  # a nested absmax: blocks 4..7 (every weight there) move
    return {"b": b, "f": f, "base": save(root / "base", **b), "ft": save(root / "ft", **f)}


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("tensor")


def _vals(d: dict) -> tuple[np.ndarray, np.ndarray]:
    k_abs = nested_absmax(d["ka"], d["nmap"], d["outer"], 0.03125)
    return values4(d["qc"], NF4, d["qabs"]), values4(d["kc"], FP4, k_abs)


def test_4bit_weights_read_as_values(pair: dict) -> None:
    q, k = _vals(pair["b"])
    src = ckptdiff.open(pair["base"])
    assert set(src.infos) == {Q, K}
    np.testing.assert_array_equal(src.read_full(Q).numpy(), q)
    np.testing.assert_array_equal(src.read_full(K).numpy(), k)
    np.testing.assert_array_equal(src.read(Q, 33, 50).numpy(), q.reshape(-1)[33:83])  # an odd start
    src.close()


def test_4bit_counts(pair: dict) -> None:
    (q0, k0), (q1, k1) = _vals(pair["b"]), _vals(pair["f"])
    rows = _rows(ckptdiff.sparsity(pair["base"], pair["ft"], progress=False).to_frame())
    assert rows.loc[Q, "changed"] == np.count_nonzero(q0 != q1) == BS + 1
    assert rows.loc[Q, "codes_changed"] == 1 and rows.loc[Q, "scale_blocks_changed"] == 1
    assert rows.loc[K, "changed"] == np.count_nonzero(k0 != k1) == N - 4 * BS
    assert rows.loc[K, "codes_changed"] == 0 and rows.loc[K, "scale_blocks_changed"] == NB - 4
    assert rows.loc[Q, "numel"] == N and bool(rows.loc[Q, "linear"]) and rows.loc[Q, "dtype_base"] == "nf4/16"
    assert rows.loc[K, "dtype_base"] == "fp4/16+nested"


def test_llm_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, size=(OUT, IN)).astype(np.int8)
    q[2] = np.where(q[2] == 0, 1, q[2])
    scb = rng.uniform(0.1, 3.0, size=OUT).astype(np.float32)

    def vals(qq: np.ndarray, s: np.ndarray) -> np.ndarray:
        out = np.zeros(qq.shape, dtype=np.float32)
        for o in range(qq.shape[0]):
            for j in range(qq.shape[1]):
                out[o, j] = np.float32(float(qq[o, j]) * float(s[o]) / 127.0)
        return out

    def save8(folder: Path, qq: np.ndarray, s: np.ndarray) -> Path:
        stem = Q[: -len(".weight")]
        sd = {
            Q: torch.from_numpy(qq),
            stem + ".SCB": torch.from_numpy(s),
            stem + ".weight_format": torch.tensor(0, dtype=torch.uint8),
        }
        save_single(sd, folder / "model.safetensors")
        cfg = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    q1, s1 = q.copy(), scb.copy()
    s1[2] *= 1.25  # one row scale: its 20 weights move
    q1[4, 7] = q1[4, 7] + 1 if q1[4, 7] < 127 else 0
    base, ft = save8(tmp_path / "b", q, scb), save8(tmp_path / "f", q1, s1)
    src = ckptdiff.open(base)
    assert set(src.infos) == {Q}
    np.testing.assert_array_equal(src.read_full(Q).numpy(), vals(q, scb))
    src.close()
    row = _rows(ckptdiff.sparsity(base, ft, progress=False).to_frame()).loc[Q]
    assert row["changed"] == np.count_nonzero(vals(q, scb) != vals(q1, s1)) == IN + 1
    assert row["codes_changed"] == 1 and row["scale_blocks_changed"] == 1 and row["dtype_base"] == "int8/row"
    assert bool(row["linear"]) and row["numel"] == OUT * IN


@pytest.mark.parametrize("chunk_bytes", [4 * 7, 4 * 33])
def test_small_chunks_count_what_whole_tensors_count(pair: dict, chunk_bytes: int) -> None:
    """Chunks of 7 or 33 entries (odd starts: half a byte, across absmax blocks and rows) give the same rows."""
    from ckptdiff.analyses.sparsity import SparsityAnalysis
    from ckptdiff.engine.alignment import align
    from ckptdiff.engine.pipeline import Run, execute

    def run(chunk: int) -> pd.DataFrame:
        views = [ckptdiff.open(pair["base"]), ckptdiff.open(pair["ft"])]
        items = align(views)
        r = Run(tuple(views), ("base", "ft"), tuple(items), torch.device("cpu"), 2 * 1024**3, chunk_bytes=chunk)
        (res,) = execute(r, [SparsityAnalysis()], progress=False)
        for v in views:
            v.close()
        return res.to_frame()

    small, whole = run(chunk_bytes), run(4 * 60_000)
    pd.testing.assert_frame_equal(small, whole)
    (q0, _), (q1, _) = _vals(pair["b"]), _vals(pair["f"])
    assert _rows(small).loc[Q, "changed"] == np.count_nonzero(q0 != q1)


def test_4bit_bytes_stored_as_bf16(pair: dict, tmp_path: Path) -> None:
    """quant_storage=bfloat16 (FSDP-QLoRA): the packed bytes are stored viewed as bf16; the values are the same."""
    b = pair["b"]
    sd = {
        Q: torch.from_numpy(pack(b["qc"])).reshape(-1).view(torch.bfloat16).reshape(-1, 1),
        Q + ".absmax": torch.from_numpy(b["qabs"]),
        Q + ".quant_map": torch.tensor(NF4, dtype=torch.float32),
        Q + ".quant_state.bitsandbytes__nf4": state("nf4", nested=False),
    }
    assert sd[Q].dtype == torch.bfloat16 and sd[Q].shape == (N // 4, 1)
    save_single(sd, tmp_path / "m" / "model.safetensors")
    src = ckptdiff.open(tmp_path / "m")
    np.testing.assert_array_equal(src.read_full(Q).numpy(), values4(b["qc"], NF4, b["qabs"]))
    np.testing.assert_array_equal(src.read(Q, 41, 30).numpy(), values4(b["qc"], NF4, b["qabs"]).reshape(-1)[41:71])
    src.close()
