"""Block-scaled FP8 checkpoints (DeepSeek-V3 layout), built by construction: quantize known matrices per block,
then change chosen codes and scales. Every expected count comes from an independent numpy float64 formula of the
dequantized values; every SVD figure is compared with the same analysis run on an fp32 checkpoint written from
this file's own dequantization.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from factory import CountingSource, as_two_ranks, save_sharded, save_single
from typer.testing import CliRunner

import ckptdiff
from ckptdiff.analyses.consistency import consistency
from ckptdiff.analyses.principal import PrincipalAnalysis
from ckptdiff.analyses.sparsity import SparsityAnalysis
from ckptdiff.cli import app
from ckptdiff.engine.alignment import align
from ckptdiff.engine.pipeline import Run, execute
from ckptdiff.errors import InputError
from ckptdiff.gate import CheckConfig, StructuralRules, parse_rule
from ckptdiff.gate.check import check
from ckptdiff.io.resolve import open_stored
from ckptdiff.io.views import fp8

E4M3 = torch.float8_e4m3fn
Q = "model.layers.0.self_attn.q_proj.weight"  # 300 x 200: blocks 3 x 2 of 128, the edge ones partial
DOWN = "model.layers.0.mlp.down_proj.weight"  # 200 x 300, unchanged
NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"
SCALE = fp8.SCALE_SUFFIX
BLOCK = (128, 128)
CONFIG = {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}}  # fmt: skip


def quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK, fmt: torch.dtype = E4M3) -> tuple[torch.Tensor, ...]:
    """Per-block absmax quantization: codes (m, n) in ``fmt`` and fp32 scales (⌈m/b₀⌉, ⌈n/b₁⌉), value = q · s."""
    m, n = w.shape
    b0, b1 = block
    scale = torch.empty(-(-m // b0), -(-n // b1))
    codes = torch.empty(m, n, dtype=fmt)
    top = torch.finfo(fmt).max
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = float(blk.abs().max()) / top or 1.0
            scale[i, j] = s
            codes[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / s).to(fmt)
    return codes, scale


def expected_values(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK) -> np.ndarray:
    """The dequantized fp32 values by an independent formula: the exact float64 product, rounded once to fp32."""
    m, n = codes.shape
    q = codes.to(torch.float32).numpy().astype(np.float64)
    s = np.repeat(np.repeat(scale.numpy().astype(np.float64), block[0], 0), block[1], 1)[:m, :n]
    return (q * s).astype(np.float32)


def value_changes(a: np.ndarray, b: np.ndarray) -> int:
    """Entries whose fp32 value changed: != is False for +0 vs −0 and True for NaN, as §1 wants."""
    return int(np.count_nonzero(a != b))


def code_changes(c0: torch.Tensor, c1: torch.Tensor) -> int:
    a, b = c0.view(torch.uint8).numpy(), c1.view(torch.uint8).numpy()
    both_zero = ((a & 0x7F) == 0) & ((b & 0x7F) == 0)
    return int(np.count_nonzero((a != b) & ~both_zero))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def build() -> dict[str, dict[str, torch.Tensor]]:
    """Base and fine-tune state dicts (weights, scales, the rest) with the changes listed in the module doc."""
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(300, 200, generator=g)
    wq[128:140, 128:140] = 0.0  # zeros in the block that gets re-scaled: they stay zero
    wq[260, 5] = 0.0  # a +0 code in the partial edge block (2, 0): the fine-tune stores −0
    wd = torch.randn(200, 300, generator=g)
    q0, s0 = quantize(wq)
    d0, ds0 = quantize(wd)
    q1, s1 = q0.clone(), s0.clone()
    b = _bytes(q1)
    # block (0, 0): ten codes move by one step, the scale stays
    idx = [(1, 1), (2, 3), (5, 8), (13, 21), (34, 55), (89, 100), (100, 2), (127, 127), (0, 64), (64, 0)]
    for i, j in idx:
        assert b[i, j] & 0x7F not in (0, 0x7E, 0x7F)
        b[i, j] = b[i, j] ^ 1
    # block (1, 1): re-scaled, codes kept: every non-zero entry changes, the zeros do not
    s1[1, 1] = s1[1, 1] * 2
    # block (1, 0): codes halved and the scale doubled: most values stay, every non-zero code changes
    q1[128:256, 0:128] = (q0[128:256, 0:128].to(torch.float32) / 2).to(E4M3)
    s1[1, 0] = s1[1, 0] * 2
    # block (2, 0), partial: +0 -> −0 changes the code bits but neither the code's value nor the weight
    assert b[260, 5] == 0
    b[260, 5] = 0x80
    # block (2, 1), partial edge: three codes change
    for i, j in ((299, 199), (256, 128), (280, 150)):
        b[i, j] = b[i, j] ^ 2
    norm = torch.ones(200, dtype=torch.bfloat16)
    embed = torch.randn(50, 200, generator=g).to(torch.bfloat16)
    weights0 = {Q: q0, DOWN: d0, NORM: norm, EMBED: embed}
    weights1 = {Q: q1, DOWN: d0.clone(), NORM: norm.clone(), EMBED: embed.clone()}
    return {
        "base": {**weights0, Q + SCALE: s0, DOWN + SCALE: ds0},
        "ft": {**weights1, Q + SCALE: s1, DOWN + SCALE: ds0.clone()},
    }


def save_fp8(sd: dict[str, torch.Tensor], folder: Path, config: dict[str, Any] | None = CONFIG) -> Path:
    """Weights in the first shard, scales in the second (every weight and its scale in different shards)."""
    weights = [k for k in sd if not k.endswith(SCALE)]
    scales = [k for k in sd if k.endswith(SCALE)]
    save_sharded({k: sd[k] for k in weights + scales}, folder, [len(weights), len(scales)])
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def dequantized_fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 checkpoint this test's own formula gives: each weight dequantized, scales dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith(SCALE):
            continue
        out[k] = torch.from_numpy(expected_values(v, sd[k + SCALE])) if k + SCALE in sd else v
    return out


@pytest.fixture(scope="module")
def sds() -> dict[str, dict[str, torch.Tensor]]:
    return build()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    return {
        "base": save_fp8(sds["base"], root / "base"),
        "ft": save_fp8(sds["ft"], root / "ft"),
        "base32": save_single(dequantized_fp32(sds["base"]), root / "base32" / "model.safetensors").parent,
        "ft32": save_single(dequantized_fp32(sds["ft"]), root / "ft32" / "model.safetensors").parent,
    }


def rules_of(texts: list[str]) -> CheckConfig:
    return CheckConfig(rules=tuple(parse_rule(t) for t in texts))


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("tensor")


# ---------------------------------------------------------------------------------------------
# the logical view and reads


def test_weights_read_as_fp32_and_scales_are_hidden(ckpts: dict[str, Path], sds: dict[str, Any]) -> None:
    src = fp8.wrap(open_stored(str(ckpts["base"])))
    assert isinstance(src, fp8.Fp8Source)
    assert set(src.infos) == {Q, DOWN, NORM, EMBED}
    info = src.infos[Q]
    assert isinstance(info, fp8.Fp8Info) and info.scaled and info.dtype.name == "F32" and info.shape == (300, 200)
    assert info.block == BLOCK and fp8.label(info) == "f8_e4m3/128x128"
    assert "2 block-scaled weights" in src.resolved and "128x128" in src.resolved and "config.json" in src.resolved
    want = expected_values(sds["base"][Q], sds["base"][Q + SCALE])
    got = src.read_full(Q).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    src.close()


def test_ranges_dequantize_into_the_callers_buffer(ckpts: dict[str, Path], sds: dict[str, Any]) -> None:
    """Any flat range, across rows and blocks, into a dirty ring buffer: the same bits as the whole matrix."""
    src = fp8.wrap(open_stored(str(ckpts["ft"])))
    want = expected_values(sds["ft"][Q], sds["ft"][Q + SCALE]).reshape(-1).view(np.uint32)
    rng = np.random.default_rng(1)
    buf = np.full(4 * 60_000, 0xAB, dtype=np.uint8)
    for start, count in [(0, 60_000), (199, 1), (127 * 200 + 150, 3_333), (59_999, 1), (200, 200), (1, 59_999)]:
        got = src.read(Q, start, count, out=buf)
        assert got.dtype == torch.float32 and got.numel() == count
        assert np.array_equal(got.numpy().view(np.uint32), want[start : start + count])
    for _ in range(20):
        start = int(rng.integers(0, 60_000))
        count = int(rng.integers(0, 60_000 - start + 1))
        got = src.read(Q, start, count, out=buf)
        assert np.array_equal(got.numpy().view(np.uint32), want[start : start + count])
    src.close()


def test_pieces_never_exceed_the_piece_size(monkeypatch: pytest.MonkeyPatch, sds: dict[str, Any]) -> None:
    """Dequantizing in small pieces (as on a 7168 x 18432 matrix) gives the same values."""
    monkeypatch.setattr(fp8, "PIECE", 97)
    codes, scale = sds["ft"][Q], sds["ft"][Q + SCALE]
    got = fp8.dequantize(codes, scale, BLOCK).numpy()
    assert np.array_equal(got.view(np.uint32), expected_values(codes, scale).view(np.uint32))


# ---------------------------------------------------------------------------------------------
# sparsity: changed iff the dequantized value changed; raw code and scale-block changes beside it


def test_sparsity_counts_dequantized_changes(ckpts: dict[str, Path], sds: dict[str, Any]) -> None:
    r = ckptdiff.sparsity(ckpts["base"], ckpts["ft"], progress=False)
    rows = _rows(r.to_frame())
    assert set(rows.index) == {Q, DOWN, NORM, EMBED}  # no *_scale_inv row
    b, f = sds["base"], sds["ft"]
    want = value_changes(expected_values(b[Q], b[Q + SCALE]), expected_values(f[Q], f[Q + SCALE]))
    assert 0 < want < 300 * 200
    q = rows.loc[Q]
    assert q["changed"] == want and q["numel"] == 300 * 200 and q["compared_as"] == "fp32"
    assert q["dtype_base"] == q["dtype_ft"] == "f8_e4m3/128x128" and q["status"] == "ok" and q["detail"] == ""
    assert q["codes_changed"] == code_changes(b[Q], f[Q]) and q["codes_changed"] != q["changed"]
    assert q["scale_blocks_changed"] == 2
    assert rows.loc[DOWN, "changed"] == 0 and rows.loc[DOWN, "codes_changed"] == 0
    assert rows.loc[DOWN, "scale_blocks_changed"] == 0
    assert pd.isna(rows.loc[EMBED, "codes_changed"]) and pd.isna(rows.loc[NORM, "scale_blocks_changed"])
    # the scales are not parameters: out of numel and every rollup
    o = r.overall()
    assert o["numel"] == 300 * 200 + 200 * 300 + 200 + 50 * 200 and o["changed"] == want
    assert r.by("module").loc["q", "numel"] == 300 * 200


def test_the_sign_of_zero_and_the_compensated_block(sds: dict[str, Any]) -> None:
    """By construction: −0 for +0 changes nothing; halved codes under a doubled scale change codes, not values."""
    b, f = sds["base"], sds["ft"]
    v0, v1 = expected_values(b[Q], b[Q + SCALE]), expected_values(f[Q], f[Q + SCALE])
    assert _bytes(f[Q])[260, 5] == 0x80 and v1[260, 5] == 0 and v0[260, 5] == v1[260, 5]
    blk = (slice(128, 256), slice(0, 128))
    assert code_changes(b[Q][blk], f[Q][blk]) > 10 * value_changes(v0[blk], v1[blk])


def test_sparsity_equals_the_fp32_checkpoint(ckpts: dict[str, Path]) -> None:
    """Everything but the dtype names and the FP8 columns equals a run on the dequantized fp32 checkpoint."""
    a = _rows(ckptdiff.sparsity(ckpts["base"], ckpts["ft"], progress=False).to_frame())
    b = _rows(ckptdiff.sparsity(ckpts["base32"], ckpts["ft32"], progress=False).to_frame())
    drop = ["dtype_base", "dtype_ft", *fp8.FP8_COLUMNS]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop).loc[a.index])


def test_tolerances_and_as_apply_to_dequantized_values(ckpts: dict[str, Path], sds: dict[str, Any]) -> None:
    b, f = sds["base"], sds["ft"]
    v0 = expected_values(b[Q], b[Q + SCALE]).astype(np.float64)
    v1 = expected_values(f[Q], f[Q + SCALE]).astype(np.float64)
    eta = 0.05
    want = int(np.count_nonzero(~((np.abs(v1 - v0) <= eta * np.maximum(np.abs(v0), np.abs(v1))) | (v0 == v1))))
    r = ckptdiff.sparsity(ckpts["base"], ckpts["ft"], rtol=eta, progress=False)
    assert _rows(r.to_frame()).loc[Q, "changed"] == want
    bf = torch.from_numpy(v0.astype(np.float32)).to(torch.bfloat16), torch.from_numpy(v1.astype(np.float32))
    want_bf16 = value_changes(bf[0].float().numpy(), bf[1].to(torch.bfloat16).float().numpy())
    r = ckptdiff.sparsity(ckpts["base"], ckpts["ft"], as_dtype="bf16", progress=False)
    assert _rows(r.to_frame()).loc[Q, "changed"] == want_bf16


def _execute(paths: list[Path], analyses: list[Any], chunk_bytes: int) -> tuple[list[Any], list[CountingSource]]:
    srcs = [CountingSource(open_stored(str(p))) for p in paths]
    views = [fp8.wrap(s) for s in srcs]
    items = align(views, labels=["base", "ft"])
    run = Run(tuple(views), ("base", "ft"), tuple(items), torch.device("cpu"), 2 * 1024**3, chunk_bytes=chunk_bytes)
    return execute(run, analyses, progress=False), srcs


def test_chunks_across_rows_and_blocks(ckpts: dict[str, Path], sds: dict[str, Any]) -> None:
    """Chunks of 777 entries (not a row, not a block) count what whole tensors count."""
    paths = [ckpts["base"], ckpts["ft"]]
    (chunked,), _ = _execute(paths, [SparsityAnalysis()], chunk_bytes=4 * 777)
    (whole,), _ = _execute(paths, [SparsityAnalysis()], chunk_bytes=4 * 60_000)
    pd.testing.assert_frame_equal(chunked.to_frame(), whole.to_frame())
    rows = _rows(chunked.to_frame())
    b, f = sds["base"], sds["ft"]
    want = value_changes(expected_values(b[Q], b[Q + SCALE]), expected_values(f[Q], f[Q + SCALE]))
    assert rows.loc[Q, "changed"] == want
    assert rows.loc[Q, "codes_changed"] == code_changes(b[Q], f[Q]) and rows.loc[Q, "scale_blocks_changed"] == 2


@pytest.mark.parametrize("chunk_bytes", [4 * 777, 16 * 1024 * 1024])
def test_each_stored_byte_is_read_once(ckpts: dict[str, Path], chunk_bytes: int) -> None:
    """Codes, scales and the rest: read once for sparsity (with its raw columns) and principal overlap together."""
    (s, p), srcs = _execute([ckpts["base"], ckpts["ft"]], [SparsityAnalysis(), PrincipalAnalysis(k=8)], chunk_bytes)
    assert _rows(s.to_frame()).loc[Q, "codes_changed"] > 0 and _rows(p.to_frame()).loc[Q, "analysed"]
    for src in srcs:
        for name, info in src.inner.infos.items():
            assert src.bytes[name] == info.nbytes, name
    (s,), srcs = _execute([ckpts["base"], ckpts["ft"]], [SparsityAnalysis()], chunk_bytes)
    for src in srcs:
        for name, info in src.inner.infos.items():
            assert src.bytes[name] == info.nbytes, name


# ---------------------------------------------------------------------------------------------
# every other analysis sees the dequantized matrices


def test_principal_and_spectral_equal_the_fp32_checkpoint(ckpts: dict[str, Path]) -> None:
    p8 = _rows(ckptdiff.principal_overlap(ckpts["base"], ckpts["ft"], k=8, svd="exact", progress=False).to_frame())
    p32 = _rows(ckptdiff.principal_overlap(ckpts["base32"], ckpts["ft32"], k=8, svd="exact", progress=False).to_frame())
    drop = ["dtype_base", "dtype_ft"]
    pd.testing.assert_frame_equal(p8.drop(columns=drop), p32.drop(columns=drop).loc[p8.index])
    assert p8.loc[Q, "analysed"] and p8.loc[Q, "changed"] > 0 and not math.isnan(p8.loc[Q, "overlap_principal"])
    s8 = _rows(ckptdiff.spectral(ckpts["base"], ckpts["ft"], k=8, progress=False).to_frame())
    s32 = _rows(ckptdiff.spectral(ckpts["base32"], ckpts["ft32"], k=8, progress=False).to_frame())
    pd.testing.assert_frame_equal(s8.drop(columns=drop), s32.drop(columns=drop).loc[s8.index])
    assert s8.loc[Q, "nss"] > 0 and s8.loc[DOWN, "nss"] == 0


def test_consistency_and_check_on_fp8(ckpts: dict[str, Path], tmp_path: Path, sds: dict[str, Any]) -> None:
    c8 = consistency(ckpts["base"], [ckpts["ft"], ckpts["ft"]], labels=["a", "b"], progress=False)
    c32 = consistency(ckpts["base32"], [ckpts["ft32"], ckpts["ft32"]], labels=["a", "b"], progress=False)
    drop = ["dtype_base", "dtype_a", "dtype_b"]
    a, b = _rows(c8.to_frame()), _rows(c32.to_frame())
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop).loc[a.index])
    want = _rows(ckptdiff.sparsity(ckpts["base"], ckpts["ft"], progress=False).to_frame()).loc[Q, "changed"]
    rules = rules_of([f"changed@{Q} == {want}", "nss@*q_proj* > 0", "ratio_principal > 0"])
    report = check(ckpts["base"], ckpts["ft"], rules)
    assert report.passed, report.to_json()
    assert "fp8_findings" not in report.header and "128x128" in report.header["base"]


# ---------------------------------------------------------------------------------------------
# unscaled FP8 tensors (no scale beside them): upcast, never a crash


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_unscaled_fp8_runs_everywhere(tmp_path: Path, fmt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=g)
    sd0 = {Q: w.to(fmt), DOWN: w.T.contiguous().to(fmt), EMBED: torch.randn(8, 16, generator=g).to(fmt)}
    sd1 = {k: (v.float() * 1.1).to(fmt) for k, v in sd0.items()}
    sd2 = {k: (v.float() * 0.9).to(fmt) for k, v in sd0.items()}
    paths = {k: save_single(v, tmp_path / f"{k}.safetensors") for k, v in (("b", sd0), ("f1", sd1), ("f2", sd2))}
    up = {k: save_single({n: t.float() for n, t in v.items()}, tmp_path / f"{k}32.safetensors")
          for k, v in (("b", sd0), ("f1", sd1), ("f2", sd2))}  # fmt: skip
    drop = ["dtype_base", "dtype_ft", "compared_as"]
    for fn in (
        lambda b, f: ckptdiff.principal_overlap(b, f, k=4, svd="exact", progress=False),
        lambda b, f: ckptdiff.spectral(b, f, k=4, progress=False),
    ):
        raw, wide = _rows(fn(paths["b"], paths["f1"]).to_frame()), _rows(fn(up["b"], up["f1"]).to_frame())
        assert raw.loc[Q, "analysed"] and raw.loc[Q, "dtype_base"] == fp8.dtypes.from_torch(fmt).short  # type: ignore[union-attr]
        pd.testing.assert_frame_equal(raw.drop(columns=drop), wide.drop(columns=drop))
    c = consistency(paths["b"], [paths["f1"], paths["f2"]], progress=False)
    cw = consistency(up["b"], [up["f1"], up["f2"]], progress=False)
    cols = ["n_a", "n_b", "n_both", "jaccard", "jaccard_magnitude", "n_same_sign"]
    pd.testing.assert_frame_equal(c.to_frame()[cols], cw.to_frame()[cols])
    report = check(paths["b"], paths["f1"], rules_of(["nss < 10", "ratio_principal > 0", "sparsity < 1"]))
    assert report.passed, report.to_json()


# ---------------------------------------------------------------------------------------------
# block size from config.json, and what cannot be dequantized


def _pair(tmp_path: Path, config: dict[str, Any] | None, block: tuple[int, int] = BLOCK) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g)
    q0, s0 = quantize(w, block)
    q1 = q0.clone()
    _bytes(q1)[0, :7] ^= 1
    base = save_fp8({Q: q0, Q + SCALE: s0}, tmp_path / "base", config)
    ft = save_fp8({Q: q1, Q + SCALE: s0.clone()}, tmp_path / "ft", config)
    return base, ft


def test_block_size_comes_from_the_config(tmp_path: Path) -> None:
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}
    base, ft = _pair(tmp_path, config, (64, 32))
    r = ckptdiff.sparsity(base, ft, progress=False)
    row = _rows(r.to_frame()).loc[Q]
    assert row["dtype_base"] == "f8_e4m3/64x32" and row["changed"] == 7 and row["detail"] == ""
    assert "64x32 blocks (config.json)" in r.header["base"]


@pytest.mark.parametrize(
    ("config", "origin"),
    [
        ({"quantization_config": {"quant_method": "fp8"}}, "default for quant_method fp8"),
        (None, "assumed: no config.json"),
        ({"model_type": "deepseek_v3"}, "assumed: config.json has no quantization_config"),
    ],
)
def test_default_block_size(tmp_path: Path, config: dict[str, Any] | None, origin: str) -> None:
    base, ft = _pair(tmp_path, config)
    r = ckptdiff.sparsity(base, ft, progress=False)
    assert _rows(r.to_frame()).loc[Q, "changed"] == 7
    assert f"128x128 blocks ({origin}" in r.header["base"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"quantization_config": {"weight_block_size": [128]}}), "two positive integers"),
        (json.dumps({"quantization_config": {"weight_block_size": [128, 0]}}), "two positive integers"),
    ],
)
def test_a_broken_config_is_bad_input(tmp_path: Path, text: str, message: str) -> None:
    base, ft = _pair(tmp_path, CONFIG)
    (base / "config.json").write_text(text)
    with pytest.raises(InputError, match=message):
        ckptdiff.sparsity(base, ft, progress=False)
    res = CliRunner().invoke(app, ["sparsity", str(base), str(ft), "-q"])
    assert res.exit_code == 2 and message in res.stderr


def test_mismatched_and_orphan_scales_are_findings(tmp_path: Path) -> None:
    """A scale whose shape does not fit, and a scale without its weight: compared as stored, with a note."""
    g = torch.Generator().manual_seed(7)
    q0, s0 = quantize(torch.randn(300, 200, generator=g))
    d0, ds0 = quantize(torch.randn(200, 300, generator=g))
    orphan = "model.layers.0.mlp.up_proj.weight" + SCALE
    sd0 = {Q: q0, DOWN: d0, Q + SCALE: s0[:2], DOWN + SCALE: ds0, orphan: torch.ones(2, 2)}
    sd1 = {k: v.clone() for k, v in sd0.items()}
    _bytes(sd1[Q])[0, :5] ^= 1
    sd1[orphan][0, 0] = 2.0
    base, ft = save_fp8(sd0, tmp_path / "base"), save_fp8(sd1, tmp_path / "ft")
    r = ckptdiff.sparsity(base, ft, progress=False)
    rows = _rows(r.to_frame())
    assert set(rows.index) == {Q, DOWN, Q + SCALE, orphan}
    q = rows.loc[Q]
    assert q["dtype_base"] == "f8_e4m3" and q["changed"] == 5 and pd.isna(q["codes_changed"])
    assert "fp8 weight not dequantized" in q["detail"] and "expected [3, 2]" in q["detail"]
    assert "scale shape [2, 2]" in rows.loc[Q + SCALE, "detail"]
    assert rows.loc[orphan, "detail"] == "fp8 scale not applied (its weight is absent): compared as a plain tensor"
    assert rows.loc[orphan, "changed"] == 1 and rows.loc[DOWN, "dtype_base"] == "f8_e4m3/128x128"
    assert set(r.structural()["tensor"]) == {Q, Q + SCALE, orphan}
    assert "3 fp8 finding(s)" in r.header["base"]
    # every command sees the same notes; check puts them in its header
    p = _rows(ckptdiff.principal_overlap(base, ft, k=4, progress=False).to_frame())
    assert p.loc[Q, "analysed"] and "fp8 weight not dequantized" in p.loc[Q, "detail"]
    report = check(base, ft, CheckConfig(structural=StructuralRules(same_keys=True)), header_only=True)
    assert "not dequantized" in report.header["fp8_findings"] and report.passed


# ---------------------------------------------------------------------------------------------
# header-only


def test_header_only_reports_fp8_weights_and_block_size(ckpts: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["check", str(ckpts["base"]), str(ckpts["ft"]), "-q", "--header-only", "--same-structure", "-f", "json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "2 block-scaled weights" in doc["header"]["base"] and "128x128 blocks (config.json)" in doc["header"]["ft"]
    plain = save_single(
        {k: v.to(torch.bfloat16) for k, v in dequantized_fp32(build()["base"]).items()},
        tmp_path / "bf16" / "model.safetensors",
    )
    res = CliRunner().invoke(
        app, ["check", str(plain), str(ckpts["ft"]), "-q", "--header-only", "--same-dtypes", "--same-param-count"]
    )
    assert res.exit_code == 1 and f"{Q}" in res.stdout and "bf16 vs fp32" in res.stdout
    assert "same_param_count" in res.stdout


def test_fp8_code_counts_survive_being_split_across_ranks(ckpts: dict[str, Path]) -> None:
    views = [fp8.wrap(open_stored(str(ckpts[k]))) for k in ("base", "ft")]
    run = Run(tuple(views), ("base", "ft"), tuple(align(views, labels=["base", "ft"])), torch.device("cpu"), 2**31)
    (whole,) = execute(run, [SparsityAnalysis()], progress=False)
    (split,) = as_two_ranks(run, lambda: [SparsityAnalysis()])
    pd.testing.assert_frame_equal(whole.to_frame(), split.to_frame())
    assert (split.to_frame()["codes_changed"].fillna(0) > 0).any()  # the FP8 columns were measured, and kept
