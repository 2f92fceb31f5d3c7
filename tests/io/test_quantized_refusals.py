"""Never a silent raw comparison: a quantized layout ckptdiff recognises but does not dequantize, or a config.json
that contradicts the tensors, exits 2 with one line naming the reason and ``--as-stored``; with ``--as-stored`` the
same pair is compared as stored, on purpose, and every such row and the header say so (every command, report and
check included)."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import save_single
from hostile import assert_refused, invoke

P = "model.layers.0.self_attn.q_proj"


def _folder(root: Path, sd: dict[str, torch.Tensor], config: dict | None) -> Path:
    save_single(sd, root / "model.safetensors")
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def nvfp4(root: Path) -> Path:
    sd = {
        P + ".weight_packed": torch.zeros(8, 8, dtype=torch.uint8),
        P + ".weight_scale": torch.ones(8, 1),
        P + ".weight_global_scale": torch.ones(1),
    }
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}
    return _folder(root, sd, cfg)


def gptq_without_config(root: Path) -> Path:
    sd = {
        P + ".qweight": torch.zeros(2, 16, dtype=torch.int32),
        P + ".qzeros": torch.zeros(1, 2, dtype=torch.int32),
        P + ".scales": torch.ones(1, 16, dtype=torch.float16),
    }
    return _folder(root, sd, None)


def awq_gemv(root: Path) -> Path:
    sd = {
        P + ".qweight": torch.zeros(16, 2, dtype=torch.int32),
        P + ".qzeros": torch.zeros(1, 2, dtype=torch.int32),
        P + ".scales": torch.ones(1, 16, dtype=torch.float16),
    }
    return _folder(root, sd, {"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}})


def int8_tiled(root: Path) -> Path:
    sd = {
        P + ".weight": torch.zeros(4, 8, dtype=torch.int8),
        P + ".SCB": torch.ones(4),
        P + ".weight_format": torch.tensor(2, dtype=torch.uint8),
    }
    return _folder(root, sd, {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})


def hqq(root: Path) -> Path:
    return _folder(root, {P + ".weight": torch.ones(4, 4)}, {"quantization_config": {"quant_method": "hqq"}})


def config_says_mxfp4(root: Path) -> Path:
    return _folder(root, {P + ".weight": torch.ones(4, 4)}, {"quantization_config": {"quant_method": "mxfp4"}})


def mxfp4_under_gptq(root: Path) -> Path:
    e = "model.layers.0.mlp.experts.down_proj"
    sd = {
        e + "_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8),
        e + "_scales": torch.zeros(2, 4, 1, dtype=torch.uint8),
    }
    return _folder(root, sd, {"quantization_config": {"quant_method": "gptq", "bits": 4}})


def quant_method_not_text(root: Path) -> Path:
    cfg = {"quantization_config": {"quant_method": ["gptq"], "bits": 4}}
    return _folder(root, {P + ".weight": torch.ones(4, 4)}, cfg)


def gpt_oss_original(root: Path) -> Path:
    sd = {
        "block.0.mlp.mlp1_weight.blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8),
        "block.0.mlp.mlp1_weight.scales": torch.zeros(2, 4, 1, dtype=torch.uint8),
    }
    return _folder(root, sd, None)


CASES: list[tuple[Callable[[Path], Path], str]] = [
    (nvfp4, "NVFP4"),
    (gptq_without_config, "packing order and bits are unknown"),
    (awq_gemv, "only 2/4/8-bit GPTQ and 4-bit AWQ GEMM"),
    (int8_tiled, "tiled"),
    (hqq, "quant_method 'hqq'"),
    (config_says_mxfp4, "no tensor is stored in that layout"),
    (mxfp4_under_gptq, "says quant_method 'gptq'"),
    (gpt_oss_original, "gpt-oss original MXFP4"),
    (quant_method_not_text, "quant_method must be a name"),
]


@pytest.mark.parametrize(("build", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_with_the_reason_and_the_way_out(tmp_path: Path, build: Callable[[Path], Path], reason: str) -> None:
    base = build(tmp_path / "base")
    ft = build(tmp_path / "ft")
    line = assert_refused(
        ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"], tmp_path, ["--as-stored"], reason
    )
    assert str(base) in line


@pytest.mark.parametrize(("build", "reason"), CASES[:4], ids=[c[0].__name__ for c in CASES[:4]])
def test_as_stored_compares_raw_and_every_row_says_so(
    tmp_path: Path, build: Callable[[Path], Path], reason: str
) -> None:
    base = build(tmp_path / "base")
    ft = build(tmp_path / "ft")
    code, _, output, _ = invoke(["sparsity", str(base), str(ft), "--as-stored", "-q", "-f", "csv"])
    assert code == 0, output
    df = pd.read_csv(StringIO(output.split("\n", 1)[1] if output.startswith("#") else output), comment="#")
    quantized = df[df["tensor"].str.startswith(P)]
    assert len(quantized) >= 2
    assert quantized["detail"].astype(str).str.contains("as stored").all(), quantized[["tensor", "detail"]]


def test_report_and_check_take_as_stored(tmp_path: Path) -> None:
    base, ft = nvfp4(tmp_path / "base"), nvfp4(tmp_path / "ft")
    code, stderr, output, _ = invoke(["check", str(base), str(ft), "--rule", "sparsity >= 0.5", "-q"])
    assert code == 2 and "--as-stored" in stderr
    code, stderr, output, _ = invoke(["check", str(base), str(ft), "--rule", "sparsity >= 0.5", "--as-stored", "-q"])
    assert code == 0, output
    assert "as stored" in output
    out = tmp_path / "rep"
    code, stderr, output, _ = invoke(["report", str(base), str(ft), "-o", str(out), "-q"])
    assert code == 2 and "--as-stored" in stderr and not out.exists()
    code, stderr, output, _ = invoke(["report", str(base), str(ft), "-o", str(out), "-q", "--as-stored"])
    assert code == 0, output
    assert "as stored" in (out / "report.md").read_text()


def test_header_only_says_what_it_cannot_read(tmp_path: Path) -> None:
    sd = {
        P + ".weight_packed": torch.zeros(4, 2, dtype=torch.int32),
        P + ".weight_scale": torch.ones(4, 1),
        P + ".weight_shape": torch.tensor([4, 16]),
    }
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}
    base, ft = _folder(tmp_path / "b", sd, cfg), _folder(tmp_path / "f", sd, cfg)
    code, stderr, _, _ = invoke(["check", str(base), str(ft), "--header-only", "--same-shapes", "-q"])
    assert code == 2 and "--header-only" in stderr and "weight_shape" in stderr and len(stderr.splitlines()) == 1
    code, _, output, _ = invoke(["check", str(base), str(ft), "--header-only", "--same-shapes", "--as-stored", "-q"])
    assert code == 0, output


def test_the_library_takes_as_stored_as_a_context(tmp_path: Path) -> None:
    import ckptdiff
    from ckptdiff.errors import InputError
    from ckptdiff.io.views.quant import as_stored

    base, ft = int8_tiled(tmp_path / "base"), int8_tiled(tmp_path / "ft")
    with pytest.raises(InputError, match="--as-stored"):
        ckptdiff.sparsity(base, ft, progress=False)
    with as_stored():
        df = ckptdiff.sparsity(base, ft, progress=False).to_frame().set_index("tensor")
    assert df.loc[P + ".weight", "detail"].startswith("as stored") and df.loc[P + ".weight", "changed"] == 0
    with pytest.raises(InputError):  # the context ended: the next run dequantizes (and refuses) again
        ckptdiff.sparsity(base, ft, progress=False)


def _bnb(root: Path, state: bytes, nbytes: int = 8) -> Path:
    w = P + ".weight"
    sd = {
        w: torch.zeros(nbytes, 1, dtype=torch.uint8),
        w + ".absmax": torch.ones(1),
        w + ".quant_map": torch.linspace(-1, 1, 16),
        w + ".quant_state.bitsandbytes__nf4": torch.frombuffer(bytearray(state), dtype=torch.uint8),
    }
    return _folder(root, sd, {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})


def _mxfp4_collision(root: Path) -> Path:
    e = "model.layers.0.mlp.experts.down_proj"
    sd = {
        e + "_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8),
        e + "_scales": torch.zeros(2, 4, 1, dtype=torch.uint8),
        e: torch.zeros(2, 32, 4),
    }
    return _folder(root, sd, {"quantization_config": {"quant_method": "mxfp4"}})


def _ct_shape(root: Path) -> Path:
    sd = {
        P + ".weight_packed": torch.zeros(4, 2, dtype=torch.int32),
        P + ".weight_scale": torch.ones(4, 1),
        P + ".weight_shape": torch.tensor([4, 16, 1]),
    }
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    return _folder(root, sd, {"quantization_config": cfg})


def _bnb_without_state(root: Path) -> Path:
    w = P + ".weight"
    sd = {w: torch.zeros(8, 1, dtype=torch.uint8), w + ".absmax": torch.ones(1), w + ".quant_map": torch.ones(16)}
    return _folder(root, sd, None)


def _blocks_without_scales(root: Path) -> Path:
    return _folder(
        root, {"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)}, None
    )


HOSTILE: list[tuple[Callable[[Path], Path], str]] = [
    (_bnb_without_state, "the rest of that weight is not in the checkpoint"),
    (_blocks_without_scales, "the rest of that weight is not in the checkpoint"),
    (lambda r: _bnb(r, b"{not json"), "does not hold the JSON"),
    (lambda r: _bnb(r, json.dumps({"shape": [4, 8], "blocksize": 64}).encode()), "contradicts the tensors"),
    (lambda r: _bnb(r, json.dumps({"shape": [], "blocksize": 64}).encode()), "no usable shape"),
    (_mxfp4_collision, "so one would hide the other"),
    (_ct_shape, "not a 2-D shape"),
]


@pytest.mark.parametrize(
    ("build", "reason"),
    HOSTILE,
    ids=["bnb-orphan", "blocks-orphan", "bnb-json", "bnb-shape", "bnb-scalar", "collision", "ct"],
)
def test_malformed_parts_are_refused(tmp_path: Path, build: Callable[[Path], Path], reason: str) -> None:
    base, ft = build(tmp_path / "base"), build(tmp_path / "ft")
    assert_refused(["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"], tmp_path, [], reason)


def test_header_only_reads_int8_shapes_from_headers(tmp_path: Path) -> None:
    sd = {P + ".weight": torch.zeros(4, 8, dtype=torch.int8), P + ".SCB": torch.ones(4),
          P + ".weight_format": torch.tensor(0, dtype=torch.uint8)}  # fmt: skip
    cfg = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    base = _folder(tmp_path / "b", sd, cfg)
    plain = _folder(tmp_path / "p", {P + ".weight": torch.zeros(4, 8, dtype=torch.bfloat16)}, None)
    code, stderr, output, _ = invoke(["check", str(base), str(plain), "--header-only", "--same-shapes", "-q"])
    assert code == 0, stderr + output


def _gptq(root: Path, cfg: dict, bits: int = 4, **parts: torch.Tensor) -> Path:
    """A 32-input, 16-output GPTQ weight packed at ``bits`` (two groups of 16), with ``parts`` replaced or added."""
    per = 32 // bits
    sd = {
        P + ".qweight": torch.zeros(32 // per, 16, dtype=torch.int32),
        P + ".qzeros": torch.zeros(2, 16 // per, dtype=torch.int32),
        P + ".scales": torch.ones(2, 16, dtype=torch.float16),
        **{f"{P}.{k}": v for k, v in parts.items()},
    }
    full = {"quant_method": "gptq", "bits": bits, "group_size": 16, "checkpoint_format": "gptq", **cfg}
    return _folder(root, sd, {"quantization_config": full})


GPTQ_HOSTILE: list[tuple[Callable[[Path], Path], list[str], str]] = [
    # each was accepted: the weight cut to the g_idx's 24 inputs; an internal error; the indices truncated
    (lambda r: _gptq(r, {}, g_idx=torch.arange(24, dtype=torch.int32) // 16), [".g_idx"], "not one group index per"),
    (lambda r: _gptq(r, {}, g_idx=torch.arange(40, dtype=torch.int32) // 20), [".g_idx"], "not one group index per"),
    (lambda r: _gptq(r, {}, g_idx=(torch.arange(32) // 16) + 0.5), [".g_idx"], "not one group index per"),
    # read as gptq_v2 (zeros not offset), silently: marlin packs another way
    (lambda r: _gptq(r, {"checkpoint_format": "marlin"}), ["checkpoint_format", "'marlin'"], "only 'gptq' and"),
    (lambda r: _gptq(r, {"checkpoint_format": 7}), ["checkpoint_format", "7"], "only 'gptq' and"),
    # float zero points were unpacked as if int32 words
    (lambda r: _gptq(r, {}, qzeros=torch.zeros(2, 2)), [".qweight"], "without int32 qzeros"),
    # 16-bit codes fit the shapes and were cut to 8 bits; a bits value not an integer was read as 4
    (lambda r: _gptq(r, {}, bits=16), ["16 bits"], "only 2/4/8-bit GPTQ"),
    (lambda r: _gptq(r, {"bits": "8"}), ["'8' bits"], "only 2/4/8-bit GPTQ"),
    (lambda r: _gptq(r, {"bits": 0}), ["0 bits"], "only 2/4/8-bit GPTQ"),
]


@pytest.mark.parametrize(
    ("build", "names", "reason"),
    GPTQ_HOSTILE,
    ids=[
        "g_idx-short",
        "g_idx-long",
        "g_idx-float",
        "marlin",
        "format-7",
        "qzeros-f32",
        "bits-16",
        "bits-str",
        "bits-0",
    ],
)
def test_gptq_parts_and_config_that_contradict_are_refused(
    tmp_path: Path, build: Callable[[Path], Path], names: list[str], reason: str
) -> None:
    base, ft = build(tmp_path / "base"), build(tmp_path / "ft")
    args = ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"]
    assert "--as-stored" in assert_refused(args, tmp_path, names, reason)


@pytest.mark.parametrize(
    "zero_point",
    [torch.ones(2, 4, dtype=torch.int8), torch.ones(8, dtype=torch.int8)],
    ids=["transposed", "flat"],  # were a misleading "file ended early" and an internal error
)
def test_an_int8_zero_point_not_shaped_as_its_scale_is_refused(tmp_path: Path, zero_point: torch.Tensor) -> None:
    """A zero point pairs with its scale entry by entry: the same number of entries in another shape is refused."""
    sd = {
        P + ".weight": torch.full((4, 16), 3, dtype=torch.int8),
        P + ".weight_scale": torch.ones(4, 2),  # two groups of 8 inputs per row
        P + ".weight_zero_point": zero_point,
    }
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized"}}
    base, ft = _folder(tmp_path / "base", sd, cfg), _folder(tmp_path / "ft", sd, cfg)
    args = ["sparsity", str(base), str(ft), "--csv", str(tmp_path / "out.csv"), "-q"]
    assert_refused(
        args, tmp_path, [".weight_zero_point", str(list(zero_point.shape))], "does not match its scale [4, 2]"
    )
