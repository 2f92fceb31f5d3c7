"""What a checkpoint's tensors are as values, when the storage is hostile or merely unusual.

The contract these tests hold ckptdiff to (docs/metrics.md §1; :func:`ckptdiff.io.resolve.logical`):

- A plain FP8 tensor (no scale) is its stored FP8 values: against bf16, fp32 or the other FP8 format it is
  compared on those values widened to a common float dtype, in every command; never a crash.
- A block-scaled FP8 weight is ``float32(codes) · scale``. Its block size comes from ``config.json``: a positive
  integer, legal however large (a block wider than the tensor is one block), refused naming the file when it is
  not one; memory follows the stored data, never the declared size. A weight dequantized on one side and raw
  FP8 on another (its scale missing or unusable there) is a structural finding, not a number.
- A fused expert tensor splits into one tensor per expert, named ``NAME[e]``. Those names never replace a stored
  tensor: a checkpoint that stores a tensor under such a name is refused, naming it. The split costs work in
  proportion to the bytes present: a header declaring absurd expert counts is refused in one line, at once.

Expected values are known by construction (k entries changed on purpose) or come from an independent decoder of
the FP8 encodings written here from the format definitions.
"""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import bump_ulps, save_single
from hostile import assert_refused, deadline
from typer.testing import CliRunner

from ckptdiff.cli import app
from ckptdiff.errors import InputError
from ckptdiff.io.resolve import open_stored
from ckptdiff.io.views import moe

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj.weight"
SECONDS = 20  # every case takes well under a second; a regression fails instead of blocking


def _cli(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI under a deadline: (exit code, stdout, stderr)."""
    with deadline(SECONDS):
        res = runner.invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


def _csv_rows(text: str) -> dict[str, dict[str, str]]:
    """A CSV (ckptdiff's per-tensor output) as {tensor: row}."""
    return {row["tensor"]: row for row in csv.DictReader(io.StringIO(text))}


# ---------------------------------------------------------------------------------------------
# an FP8 decoder from the format definitions (OCP 8-bit floating point), independent of torch


def fp8_values(codes: np.ndarray, fmt: str) -> np.ndarray:
    """The float64 values of FP8 bit patterns (uint8): ``e4m3`` (bias 7, no inf, S.1111.111 NaN) or ``e5m2``
    (bias 15, IEEE-like inf and NaN)."""
    b = codes.astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    mbits, bias = (3, 7) if fmt == "e4m3" else (2, 15)
    emax = (1 << (7 - mbits)) - 1
    e = (b >> mbits) & emax
    m = (b & ((1 << mbits) - 1)).astype(np.float64)
    frac = m / (1 << mbits)
    value = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    if fmt == "e4m3":
        value = np.where((e == emax) & (m == 7), np.nan, value)
    else:
        value = np.where(e == emax, np.where(m == 0, np.inf, np.nan), value)
    return sign * value


@pytest.mark.parametrize(("fmt", "dtype"), [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_the_decoder_matches_every_code(fmt: str, dtype: torch.dtype) -> None:
    """All 256 codes: the decoder here and torch's widening agree (NaN for NaN), so either may build inputs."""
    codes = np.arange(256, dtype=np.uint8)
    ours = fp8_values(codes, fmt)
    theirs = torch.from_numpy(codes).view(dtype).to(torch.float64).numpy()
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# item 15: a plain (unscaled) FP8 tensor against bf16, fp32 or the other FP8 format, in every command

SHAPE = (24, 16)
N = SHAPE[0] * SHAPE[1]
CHANGED = {"bf16": range(0, 7), "fp32": range(3, 14), "e5m2": range(20, 25)}  # entries changed on purpose


def _base_codes() -> np.ndarray:
    """E4M3 codes of finite values that e5m2 holds exactly too: an even mantissa (two bits), |v| ≤ 448."""
    rng = np.random.default_rng(15)
    codes = rng.integers(0, 256, size=SHAPE, dtype=np.uint8) & 0xFE  # drops the last mantissa bit, and NaN (0x7F)
    codes[0, 0], codes[0, 1] = 0x00, 0x80  # +0 and −0
    return codes


def _fine_tunes(codes: np.ndarray) -> dict[str, torch.Tensor]:
    """The base's values stored as bf16, fp32 and e5m2 (exactly: checked), then the CHANGED entries moved."""
    values = fp8_values(codes, "e4m3")  # (24, 16) float64
    exact = torch.from_numpy(values.astype(np.float32))
    out = {"bf16": exact.to(torch.bfloat16), "fp32": exact.clone(), "e5m2": exact.to(torch.float8_e5m2)}
    assert np.array_equal(out["bf16"].double().numpy(), values)
    assert np.array_equal(fp8_values(out["e5m2"].view(torch.uint8).numpy(), "e5m2"), values)
    out["bf16"] = bump_ulps(out["bf16"], torch.tensor(list(CHANGED["bf16"])))
    out["fp32"] = bump_ulps(out["fp32"], torch.tensor(list(CHANGED["fp32"])))
    flat = out["e5m2"].view(torch.uint8).reshape(-1).clone()
    flat[list(CHANGED["e5m2"])] ^= 0x04  # the exponent's last bit: another finite value (exponents stay ≤ 23)
    out["e5m2"] = flat.view(torch.float8_e5m2).reshape(SHAPE)
    return out


@pytest.fixture(scope="module")
def plain_fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base: plain F8_E4M3; bf16 / fp32 / e5m2: fine-tunes; base32: the base's values as fp32 (for reference)."""
    root = tmp_path_factory.mktemp("plain_fp8")
    codes = _base_codes()
    base = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    paths = {"base": save_single({Q: base}, root / "base.safetensors")}
    widened = torch.from_numpy(fp8_values(codes, "e4m3").astype(np.float32))
    paths["base32"] = save_single({Q: widened}, root / "base32.safetensors")
    for kind, t in _fine_tunes(codes).items():
        paths[kind] = save_single({Q: t}, root / f"{kind}.safetensors")
    return paths


def _expected_changes(paths: dict[str, Path], kind: str) -> int:
    """Entries whose value differs, decoded from the stored bytes (+0 equals −0: the values compare equal)."""
    from safetensors.torch import load_file

    def stored(key: str) -> np.ndarray:
        return load_file(str(paths[key]))[Q].reshape(-1).view(torch.uint8).numpy()  # the bytes, little-endian

    v0 = fp8_values(stored("base"), "e4m3")
    raw = stored(kind)
    if kind == "e5m2":
        v1 = fp8_values(raw, "e5m2")
    elif kind == "bf16":
        v1 = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        v1 = raw.view(np.float32).astype(np.float64)
    return int(np.count_nonzero(v0 != v1))


@pytest.mark.parametrize("kind", ["bf16", "fp32", "e5m2"])
def test_plain_fp8_against_another_float_dtype(plain_fp8: dict[str, Path], kind: str) -> None:
    """sparsity, principal-overlap, spectral and check on plain e4m3 against bf16 / fp32 / e5m2: compared in fp32."""
    base, ft = str(plain_fp8["base"]), str(plain_fp8[kind])
    want = len(CHANGED[kind])
    assert _expected_changes(plain_fp8, kind) == want
    code, out, err = _cli(["sparsity", base, ft, "-q", "-f", "csv"])
    assert code == 0, err
    row = _csv_rows(out)[Q]
    assert row["status"] == "dtype_changed" and row["compared_as"] == "fp32" and row["dtype_base"] == "f8_e4m3"
    assert int(row["changed"]) == want and int(row["numel"]) == N
    # the bf16 figure (what crashed): fp32 values one ULP off a bf16 value round back to it; bf16 and e5m2 keep theirs
    assert int(row["changed_bf16"]) == (0 if kind == "fp32" else want)
    # principal-overlap and spectral: the numbers of the same run on the base widened to fp32 by the decoder
    for command in (["principal-overlap", "--k", "4", "--svd", "exact"], ["spectral", "--k", "4"]):
        frames = []
        for b in (base, str(plain_fp8["base32"])):
            code, out, err = _cli([command[0], b, ft, "-q", "-f", "csv", *command[1:]])
            assert code == 0, err
            frames.append(pd.read_csv(io.StringIO(out)).set_index("tensor"))
        raw, wide = frames
        assert bool(raw.loc[Q, "analysed"]), command
        drop = [c for c in ("dtype_base", "compared_as", "detail", "status") if c in raw.columns]
        pd.testing.assert_frame_equal(raw.drop(columns=drop), wide.drop(columns=drop))
    code, out, err = _cli(["check", base, ft, "-q", "-f", "json", "--rule", f"changed == {want}",
                           "--rule", "nss > 0", "--rule", "ratio_principal > 0"])  # fmt: skip
    assert code == 0, err + out
    assert json.loads(out)["passed"]


def test_plain_fp8_in_consistency_and_report(plain_fp8: dict[str, Path], tmp_path: Path) -> None:
    """consistency (e4m3 base, bf16 and fp32 fine-tunes) and report (every analysis in one pass) on the same pair."""
    base, a, b = (str(plain_fp8[k]) for k in ("base", "bf16", "fp32"))
    code, out, err = _cli(["consistency", base, a, b, "-q", "-f", "csv", "-l", "a", "-l", "b"])
    assert code == 0, err
    row = _csv_rows(out)[Q]
    both = len(set(CHANGED["bf16"]) & set(CHANGED["fp32"]))
    assert (int(row["n_a"]), int(row["n_b"]), int(row["n_both"])) == (7, 11, both)
    code, out, err = _cli(["report", base, a, b, "-q", "-o", str(tmp_path / "rep"), "-l", "a", "-l", "b"])
    assert code == 0, err
    rows = pd.read_csv(tmp_path / "rep" / "tensors.csv").set_index(["run", "tensor"])
    assert rows.loc[("a", Q), "changed"] == 7 and rows.loc[("b", Q), "changed"] == 11
    assert bool(rows.loc[("a", Q), "principal_analysed"]) and bool(rows.loc[("b", Q), "spectral_analysed"])
    assert rows.loc[("b", Q), "compared_as"] == "fp32" and rows.loc[("a", Q), "nss"] > 0


# ---------------------------------------------------------------------------------------------
# item 10: a block-scaled FP8 weight on one side, raw FP8 on the other (scale missing or of another shape)

K = "model.layers.0.self_attn.k_proj.weight"
SCALE = "_scale_inv"
BLOCK = 16
FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}}
K_CHANGED = 5


def _scaled_codes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 40 x 24 e4m3 weight of finite codes below 0x70 (so flipping the last bit stays finite) and its 3 x 2 scale."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 0x70, size=(40, 24), dtype=np.uint8) | (rng.integers(0, 2, (40, 24), np.uint8) << 7)
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, size=(3, 2)).astype(np.float32))
    return torch.from_numpy(codes).view(torch.float8_e4m3fn), scale


def _save_fp8(root: Path, name: str, sd: dict[str, torch.Tensor]) -> str:
    folder = root / name
    folder.mkdir()
    save_single({k: v.clone() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(FP8_CONFIG))
    return str(folder)


@pytest.fixture(scope="module")
def one_sided(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """base: Q and K block-scaled; each fine-tune: K scaled with K_CHANGED codes flipped, Q as the case says."""
    root = tmp_path_factory.mktemp("one_sided")
    q, qs = _scaled_codes(1)
    k, ks = _scaled_codes(2)
    k1 = k.view(torch.uint8).clone().reshape(-1)
    k1[torch.arange(K_CHANGED) * 97] ^= 1  # the last mantissa bit: another finite value, never ±0 twice
    k1 = k1.view(torch.float8_e4m3fn).reshape(k.shape)
    ft_k = {K: k1, K + SCALE: ks}
    return {
        "base": _save_fp8(root, "base", {Q: q, Q + SCALE: qs, K: k, K + SCALE: ks}),
        "missing": _save_fp8(root, "missing", {Q: q, **ft_k}),  # Q's scale dropped
        "shape": _save_fp8(root, "shape", {Q: q, Q + SCALE: qs[:2], **ft_k}),  # Q's scale of another shape
        "transposed": _save_fp8(root, "transposed", {Q: q, Q + SCALE: qs.T.contiguous(), **ft_k}),
    }


def _k_changes(one_sided: dict[str, str]) -> int:
    """K's dequantized changes, decoded from the stored bytes: code value times its block's scale."""
    from safetensors.torch import load_file

    def values(key: str) -> np.ndarray:
        sd = load_file(str(Path(one_sided[key]) / "model.safetensors"))
        codes = fp8_values(sd[K].view(torch.uint8).numpy(), "e4m3")
        scale = np.repeat(np.repeat(sd[K + SCALE].numpy().astype(np.float64), BLOCK, 0), BLOCK, 1)[:40, :24]
        return (codes * scale).astype(np.float32)

    return int(np.count_nonzero(values("base") != values("missing")))


@pytest.mark.parametrize("case", ["missing", "shape", "transposed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["ft-raw", "base-raw"])
def test_a_scale_on_one_side_only_is_a_finding(one_sided: dict[str, str], case: str, reverse: bool) -> None:
    """Dequantized values against raw codes would count nearly every entry as changed: the weight is not
    compared (status scale_mismatch, the reason in detail), the rest of the checkpoint is."""
    base, ft = (one_sided[case], one_sided["base"]) if reverse else (one_sided["base"], one_sided[case])
    assert _k_changes(one_sided) == K_CHANGED
    code, out, err = _cli(["sparsity", base, ft, "-q", "-f", "csv"])
    assert code == 0, err
    rows = _csv_rows(out)
    q = rows[Q]
    assert q["status"] == "scale_mismatch" and q["changed"] == "" and q["compared_as"] == ""
    raw, scaled = ("base", "ft") if reverse else ("ft", "base")
    assert q["detail"].startswith(f"fp8 scale on one side only: f8_e4m3/16x16 dequantized in {scaled}, raw f8_e4m3")
    assert f"usable scale in {raw}; not compared" in q["detail"]
    assert int(rows[K]["changed"]) == K_CHANGED and rows[K]["status"] == "ok"
    code, out, err = _cli(["principal-overlap", base, ft, "-q", "-f", "csv", "--k", "2"])
    assert code == 0, err
    rows = _csv_rows(out)
    assert rows[Q]["status"] == "scale_mismatch" and rows[Q]["analysed"] == "False"
    assert rows[K]["analysed"] == "True" and int(rows[K]["changed"]) == K_CHANGED
    code, out, err = _cli(["check", base, ft, "-q", "--header-only", "--same-dtypes", "-f", "json"])
    assert code == 1, err + out
    (rule,) = json.loads(out)["rules"]
    assert [o["tensor"] for o in rule["offenders"]] == [Q]


def test_nothing_comparable_but_mismatched_scales_says_so(tmp_path: Path) -> None:
    """When the mismatched weight is all there is, the refusal names the cause, not 'different models'."""
    q, qs = _scaled_codes(1)
    base, alone = _save_fp8(tmp_path, "base", {Q: q, Q + SCALE: qs}), _save_fp8(tmp_path, "alone", {Q: q})
    code, _, err = _cli(["sparsity", base, alone, "-q"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "1 scale mismatch" in err and "*_scale_inv" in err


# ---------------------------------------------------------------------------------------------
# item 1: a stored tensor named like an expert slice never gets replaced by the slice

DOWN = "model.layers.0.mlp.experts.down_proj"


def _refused(tmp_path: Path, base: Path, ft: Path, names: list[str], expect: str) -> None:
    """sparsity and (for safetensors) check --header-only refuse the pair in one line naming all of ``names``."""
    outs = ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json"), "-q"]
    assert_refused(["sparsity", str(base), str(ft), *outs], tmp_path, names, expect)
    if base.suffix != ".safetensors":
        return
    args = ["check", str(base), str(ft), "--header-only", "--same-keys", "--json", str(tmp_path / "out.json")]
    assert_refused(args, tmp_path, names, expect)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin alias"])
def test_a_stored_name_like_an_expert_slice_is_refused(tmp_path: Path, fmt: str) -> None:
    """Both checkpoints store a fused (2, 4, 6) tensor and a (4, 6) tensor named like its slice 0, every entry of
    which differs between them: the split used to replace it by the fused slice (0 changed). In a .bin the name
    may also be an alias of the fused tensor's storage (a tied name)."""
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(2, 4, 6, generator=g).to(torch.bfloat16)
    lone = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = []
    for side, value in (("base", lone), ("ft", lone + 1)):
        if fmt == "safetensors":
            paths.append(save_single({DOWN: fused, DOWN + "[0]": value}, inputs / f"{side}.safetensors"))
        else:
            path = inputs / f"{side}.bin"
            torch.save({DOWN: fused, DOWN + "[0]": fused if fmt == "bin alias" else value}, path)
            paths.append(path)
    names = [paths[0].name, f"'{DOWN}[0]'", f"'{DOWN}'"]  # the base, refused first
    _refused(tmp_path, paths[0], paths[1], names, "ckptdiff gives expert 0 of the fused")


def test_a_slice_name_across_checkpoints_is_paired(tmp_path: Path) -> None:
    """Only a clash inside one checkpoint is refused: a base storing expert 0 as NAME[0] and a fine-tune storing
    the fused tensor pair by name, each side's names being its own (the slice holds what NAME[0] holds)."""
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(2, 4, 6, generator=g).to(torch.bfloat16)
    base = save_single({DOWN + "[0]": fused[0].clone(), DOWN + "[1]": fused[1].clone()}, tmp_path / "b.safetensors")
    ft = save_single({DOWN: bump_ulps(fused, torch.arange(3))}, tmp_path / "f.safetensors")
    code, out, err = _cli(["sparsity", str(base), str(ft), "-q", "-f", "csv"])
    assert code == 0, err
    rows = _csv_rows(out)
    assert [int(rows[f"{DOWN}[{e}]"]["changed"]) for e in range(2)] == [3, 0]


# ---------------------------------------------------------------------------------------------
# item 6: expansion bombs: work in proportion to the bytes present, absurd expert counts refused at once


def _fused_header(folder: Path, shape: list[int], data: int = 0, name: str = "bad.safetensors") -> Path:
    """A safetensors file with one bf16 fused expert tensor of ``shape`` and ``data`` bytes of zeros."""
    raw = json.dumps({DOWN: {"dtype": "BF16", "shape": shape, "data_offsets": [0, data]}}).encode()
    path = folder / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    return path


def _many_fused(folder: Path, tensors: int, experts: int) -> Path:
    """``tensors`` fused (experts, 1) bf16 tensors in one file: each within the expert bound, many in all."""
    sd = {f"model.layers.{i}.mlp.experts.down_proj": torch.zeros(experts, 1, dtype=torch.bfloat16)
          for i in range(tensors)}  # fmt: skip
    return save_single(sd, folder / "bad.safetensors")


BOMBS = [
    ("100,000 empty experts in 112 bytes", lambda d: _fused_header(d, [100_000, 0]), "100,000 experts"),
    ("2^40 empty experts", lambda d: _fused_header(d, [2**40, 0]), "1,099,511,627,776 experts"),
    ("100,000 experts with their bytes", lambda d: _fused_header(d, [100_000, 1], 200_000), "100,000 experts"),
    ("too many slices in all", lambda d: _many_fused(d, moe.MAX_SLICES // moe.MAX_EXPERTS + 1, moe.MAX_EXPERTS),
     "per-expert tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "expect"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_expert_bombs_are_refused_at_once(tmp_path: Path, build: object, expect: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = build(inputs)  # type: ignore[operator]
    base = save_single({"w": torch.zeros(2, 2)}, tmp_path / "base.safetensors")
    _refused(tmp_path, base, bad, [bad.name, "down_proj'"], expect)


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    """MAX_EXPERTS experts in one tensor split (reading the header only, at once); one more is refused."""
    ok = _fused_header(tmp_path, [moe.MAX_EXPERTS, 1], 2 * moe.MAX_EXPERTS, "ok.safetensors")
    over = _fused_header(tmp_path, [moe.MAX_EXPERTS + 1, 1], 2 * moe.MAX_EXPERTS + 2, "over.safetensors")
    with deadline(SECONDS):
        view = moe.split(open_stored(str(ok)))
        assert isinstance(view, moe.SplitExpertsSource) and len(view.infos) == moe.MAX_EXPERTS
        with pytest.raises(InputError, match="16,385 experts"):
            moe.split(open_stored(str(over)))


def test_empty_experts_are_not_split(tmp_path: Path) -> None:
    """A fused tensor of 300 empty experts holds no bytes: it stays one (empty) tensor, no 300 rows."""
    path = _fused_header(tmp_path, [300, 0], 0, "empty.safetensors")
    src = open_stored(str(path))
    assert moe.split(src) is src
    code, out, err = _cli(["sparsity", str(path), str(path), "-q", "-f", "csv"])
    assert code == 0, err
    assert list(_csv_rows(out)) == [DOWN]


# ---------------------------------------------------------------------------------------------
# item 8: the FP8 block size: any positive integer (longer than the weight: one block), memory from the data


def _block_pair(tmp_path: Path, block: list[int], scale_shape: tuple[int, int]) -> tuple[str, str, np.ndarray]:
    """A 40 x 24 e4m3 weight under ``block`` (config.json) with a scale of ``scale_shape``; the fine-tune flips
    K_CHANGED codes. Returns both folders and the base's values decoded here: code value times its block's scale."""
    codes, _ = _scaled_codes(3)
    rng = np.random.default_rng(8)
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, size=scale_shape).astype(np.float32))
    flipped = codes.view(torch.uint8).clone().reshape(-1)
    flipped[torch.arange(K_CHANGED) * 31] ^= 1
    config = json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": block}})
    folders = []
    for side, c in (("base", codes), ("ft", flipped.view(torch.float8_e4m3fn).reshape(codes.shape))):
        folder = tmp_path / side
        folder.mkdir(parents=True)
        save_single({Q: c, Q + SCALE: scale.clone()}, folder / "model.safetensors")
        (folder / "config.json").write_text(config)
        folders.append(str(folder))
    rows = np.minimum(np.arange(40) // min(block[0], 40), scale_shape[0] - 1)  # a block longer than the weight: 0
    cols = np.minimum(np.arange(24) // min(block[1], 24), scale_shape[1] - 1)
    s = scale.numpy().astype(np.float64)[rows][:, cols]  # (40, 24) the scale of each entry
    values = (fp8_values(codes.view(torch.uint8).numpy(), "e4m3") * s).astype(np.float32)
    return folders[0], folders[1], values


@pytest.mark.parametrize(
    ("block", "scale_shape"),
    [([2**31, 2**40], (1, 1)), ([2**40, 16], (1, 2)), ([16, 2**62], (3, 1)), ([2**63 - 1, 2**63 - 1], (1, 1))],
    ids=["2^31 x 2^40", "2^40 x 16", "16 x 2^62", "(2^63-1) x (2^63-1)"],
)
def test_a_block_longer_than_the_weight_is_one_block(
    tmp_path: Path, block: list[int], scale_shape: tuple[int, int]
) -> None:
    """Such a block size used to allocate its length in scale entries (terabytes) or overflow: it is one block."""
    from ckptdiff.io.views import fp8

    base, ft, want = _block_pair(tmp_path, block, scale_shape)
    with deadline(SECONDS):
        src = fp8.wrap(open_stored(base))
        got = src.read_full(Q).numpy()
        src.close()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    code, out, err = _cli(["sparsity", base, ft, "-q", "-f", "csv"])
    assert code == 0, err
    row = _csv_rows(out)[Q]
    assert int(row["changed"]) == K_CHANGED and row["dtype_base"] == f"f8_e4m3/{block[0]}x{block[1]}"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[0, 16]", "got [0, 16]"),
        ("[-16, 16]", "got [-16, 16]"),
        ("[16.5, 16]", "got [16.5, 16]"),
        ("[16.0, 16]", "got [16.0, 16]"),
        ("[true, 16]", "got [true, 16]"),
        ('["16", 16]', 'got ["16", 16]'),
        ("[1e30, 1e30]", "got [1e+30, 1e+30]"),
        ("[9223372036854775808, 16]", "got [9223372036854775808, 16]"),  # 2^63
        ("[" + "1" * 200 + ", 16]", "got [" + "1" * 20),
        ("[" + "9" * 5000 + ", 16]", "more than 4,300 digits"),
        ("[16, 16, 16]", "two positive integers"),
    ],
    ids=["0", "negative", "fraction", "float", "bool", "string", "1e30", "2^63", "200 digits", "5000 digits", "three"],
)
def test_a_bad_block_size_is_refused_naming_config_json(tmp_path: Path, text: str, expect: str) -> None:
    """Not a positive integer, or past any tensor dimension: exit 2, one line naming the file (the 5000-digit
    number used to escape as a Python ValueError while the file was parsed)."""
    base, ft, _ = _block_pair(tmp_path / "inputs", [16, 16], (3, 2))
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": "@"}}
    (Path(ft) / "config.json").write_text(json.dumps(config).replace('"@"', text))
    outs = ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json"), "-q"]
    line = assert_refused(["sparsity", base, ft, *outs], tmp_path, ["ft/config.json"], expect)
    assert len(line) < 400  # one readable line, whatever the file holds
