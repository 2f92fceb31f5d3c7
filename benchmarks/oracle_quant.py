"""One-off oracle: ckptdiff's dequantized values against the reference implementations of each quantized format.

Not part of the test suite and never imported by ckptdiff. It needs the reference libraries, which are not (and must
not become) ckptdiff dependencies, so it runs from a separate virtual environment:

    python3 -m venv /tmp/oracle-venv
    /tmp/oracle-venv/bin/pip install torch==2.13.0 transformers==5.25.0 compressed-tensors==0.20.0 -e .
    pip download --no-deps autoawq==0.2.9 -d /tmp/awq && tar xzf /tmp/awq/autoawq-0.2.9.tar.gz -C /tmp/awq
    /tmp/oracle-venv/bin/python benchmarks/oracle_quant.py --autoawq /tmp/awq/autoawq-0.2.9/awq/utils/packing_utils.py

compressed-tensors 0.20 no longer reads an act-order ``weight_g_idx``; that case runs against 0.12.2 (the last
release line whose ``dequantize`` takes ``g_idx``) from a second environment:

    python3 -m venv /tmp/oracle-ct-old
    /tmp/oracle-ct-old/bin/pip install torch==2.13.0 compressed-tensors==0.12.2 -e .
    /tmp/oracle-ct-old/bin/python benchmarks/oracle_quant.py --only ct-gidx

Every case stores random codes and scales in the format's real tensors (several seeds, odd shapes), dequantizes
them with the reference, reads the same checkpoint through ``ckptdiff.open(...).read_full`` and prints, per format,
the cases compared, the largest absolute difference and whether every value is bit-identical. References that form
the product in a 16-bit dtype (bf16/fp16 scales, transformers' bf16 experts) are run twice: with the scale dtype
widened to fp32 (ckptdiff's fp32 values must match bit for bit) and in their own dtype (ckptdiff's values rounded to
that dtype must match bit for bit).

References:
- MXFP4: transformers ``integrations/mxfp4.py`` ``convert_moe_packed_tensors`` (the installed package, called).
- compressed-tensors: the installed package's compressors (``BaseCompressor`` registry ``decompress``) and its
  ``pack_to_int32``, which also builds the stored tensors; 0.12.2's ``unpack_from_int32`` + ``dequantize(g_idx=...)``.
- AWQ GEMM: AutoAWQ 0.2.9 ``awq/utils/packing_utils.py`` ``dequantize_gemm`` (the released file, loaded by path: it
  imports only torch; the rest of the package needs CUDA builds).
- GPTQ: GPTQModel's ``PackableQuantLinear.dequantize_weight`` (gptqmodel/nn_modules/qlinear/__init__.py, commit
  00f3d5eff6f01b64f3eac2a9109572b296a1e461) after its v1 -> v2 zero conversion (``convert_gptq_v1_to_v2_format_module``
  in gptqmodel/utils/model.py: ``qzeros += 0x11111111`` for 4 bits), and AutoGPTQ's torch path
  (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, commit 179776bd1d97a2e7f84b72318630f43719647a11: zeros unpacked,
  masked, plus one). Both packages need CUDA builds, so those few lines are re-typed below (``_gptqmodel_*``,
  ``_autogptq_*``), following the files and commits named.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

import ckptdiff

SEEDS = (0, 1, 2, 3)


class Tally:
    """Per format: cases, largest |ckptdiff − reference|, and how many cases were not bit-identical."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, fmt: str, case: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        """``ref`` in any float dtype; ``got`` (ckptdiff's fp32) is rounded to it first when it is narrower."""
        row = self.rows.setdefault(fmt, {"cases": 0, "entries": 0, "max_abs": 0.0, "not_identical": []})
        assert got.shape == ref.shape, (fmt, case, got.shape, ref.shape)
        g = got.to(ref.dtype) if ref.dtype != torch.float32 else got
        ident = bool(torch.equal(_bits(g), _bits(ref)))
        a, b = g.to(torch.float64), ref.to(torch.float64)
        nan_mismatch = int((a.isnan() != b.isnan()).sum())
        both = ~(a.isnan() | b.isnan())
        same_inf = (a == b) & both
        diff = torch.where(same_inf, 0.0, (a - b).abs())[both]
        mx = float(diff.max()) if diff.numel() else 0.0
        row["cases"] += 1
        row["entries"] += got.numel()
        row["max_abs"] = max(row["max_abs"], mx if nan_mismatch == 0 else float("nan"))
        if not ident:
            row["not_identical"].append(f"{case} (max abs {mx:.3g}, NaN mismatches {nan_mismatch})")

    def print(self) -> None:
        print(f"{'format':44s} {'cases':>5s} {'entries':>8s} {'max abs diff':>13s}  bit-identical")
        for fmt, r in self.rows.items():
            ok = "yes" if not r["not_identical"] else f"NO in {len(r['not_identical'])}"
            print(f"{fmt:44s} {r['cases']:5d} {r['entries']:8d} {r['max_abs']:13.3g}  {ok}")
            for line in r["not_identical"][:6]:
                print(f"    {line}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def _save(folder: Path, sd: dict[str, torch.Tensor], quant: dict[str, Any], **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    sd["model.norm.weight"] = torch.ones(8, dtype=torch.bfloat16)  # one plain tensor beside the quantized ones
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**extra, "quantization_config": quant}))
    return folder


def _read(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    src = ckptdiff.open(folder)
    try:
        return {n: src.read_full(n).reshape(src.infos[n].shape) for n in names}
    finally:
        src.close()


# ---------------------------------------------------------------- MXFP4 (transformers)


def mxfp4(tally: Tally, root: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base = "model.layers.0.mlp.experts."
    shapes = [(3, 7, 1), (2, 5, 3), (1, 64, 2), (4, 12, 2)]  # (experts, rows, 32-value groups per row)
    for seed in SEEDS:
        for k, (e, r, g) in enumerate(shapes):
            gen = torch.Generator().manual_seed(seed * 100 + k)
            sd = {}
            for proj, rows in (("gate_up_proj", r), ("down_proj", r + 1)):
                blocks = torch.randint(0, 256, (e, rows, g, 16), generator=gen, dtype=torch.uint8)
                scales = torch.randint(100, 155, (e, rows, g), generator=gen, dtype=torch.uint8)
                # the ends of the exponent range: 2^-127 (an fp32 subnormal), 2^-126, 2^126, 2^127 (6·2^127 is inf)
                flat = scales.reshape(-1)
                flat[torch.randint(0, flat.numel(), (4,), generator=gen)] = torch.tensor(
                    [0, 1, 253, 254], dtype=torch.uint8
                )
                sd[base + proj + "_blocks"], sd[base + proj + "_scales"] = blocks, scales
            folder = _save(root / f"mxfp4-{seed}-{k}", sd, {"quant_method": "mxfp4"}, model_type="gpt_oss")
            names = [f"{base}{p}[{i}]" for p in ("gate_up_proj", "down_proj") for i in range(e)]
            got = _read(folder, names)
            for proj in ("gate_up_proj", "down_proj"):
                blocks, scales = sd[base + proj + "_blocks"], sd[base + proj + "_scales"]
                for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                    ref = convert_moe_packed_tensors(blocks, scales, dtype=dt)  # (E, 32·G, rows)
                    for i in range(e):
                        tally.add(f"mxfp4 vs transformers ({tag})", f"seed {seed} {proj}[{i}] {e}x{r}x{g}",
                                  got[f"{base}{proj}[{i}]"], ref[i])  # fmt: skip
    # the scale byte 255: 2^128 for transformers' ldexp (the OCP definition would call it NaN)
    blocks = torch.randint(0, 256, (1, 2, 1, 16), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    blocks[0, 0, 0, :8] = torch.tensor([0x10, 0x98, 0x09, 0x81, 0x72, 0xF0, 0x0F, 0x88], dtype=torch.uint8)
    scales = torch.tensor([[[255], [127]]], dtype=torch.uint8)
    sd = {base + "down_proj_blocks": blocks, base + "down_proj_scales": scales}
    folder = _save(root / "mxfp4-255", sd, {"quant_method": "mxfp4"}, model_type="gpt_oss")
    got = _read(folder, [base + "down_proj[0]"])[base + "down_proj[0]"]
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dt)[0]
        tally.add(f"mxfp4 edge: scale byte 255 ({tag})", "scale 255 (column 0, every code), 127 (column 1)", got, ref)


# ---------------------------------------------------------------- compressed-tensors (0.20: compressors registry)


def _ct_cfg(fmt: str, weights: dict[str, Any]) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }


def _scales(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.05 + 1e-3).to(dtype)


def ct(tally: Tally, root: Path) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def run(
        label: str, case: str, fmt: str, wargs: dict[str, Any], stored: dict[str, torch.Tensor], folder: Path
    ) -> None:
        """Store ``stored`` (local names) as layer P, decompress it with the registry's compressor, read it back."""
        p = "model.layers.0.self_attn.q_proj"
        _save(folder, {f"{p}.{k}": v for k, v in stored.items()}, _ct_cfg(fmt, wargs))
        got = _read(folder, [f"{p}.weight"])[f"{p}.weight"]
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs))
        comp = BaseCompressor.get_value_from_registry(fmt)
        ref = comp.decompress(dict(stored), scheme)["weight"]
        tally.add(f"ct {label} vs compressed-tensors ({ref.dtype})".replace("torch.", ""), case, got, ref)
        if ref.dtype != torch.float32:
            wide = dict(stored)
            wide["weight_scale"] = stored["weight_scale"].float()
            ref32 = comp.decompress(wide, scheme)["weight"]
            tally.add(f"ct {label} vs compressed-tensors (scale as fp32)", case, got, ref32)

    k = 0
    for seed in SEEDS:
        for bits in (4, 8, 2):
            for strategy, sym, out_f, in_f, gs in (
                ("group", True, 12, 48, 16),
                ("group", True, 7, 36, 12),  # 36 inputs: the last int32 word holds padding
                ("group", False, 13, 40, 8),  # 13 rows: the packed zero points' last word holds padding
                ("channel", True, 9, 20, None),
                ("channel", False, 11, 24, None),
                ("tensor", True, 6, 17, None),
            ):
                k += 1
                gen = torch.Generator().manual_seed(seed * 1000 + k)
                half = 1 << (bits - 1)
                q = torch.randint(-half, half, (out_f, in_f), generator=gen, dtype=torch.int8)
                n_g = in_f // gs if gs else 1
                sdt = (torch.bfloat16, torch.float16, torch.float32)[k % 3]
                s = _scales(gen, (out_f, n_g) if strategy != "tensor" else (1,), sdt)
                stored = {
                    "weight_packed": pack_to_int32(q, bits),
                    "weight_scale": s,
                    "weight_shape": torch.tensor([out_f, in_f]),
                }
                if not sym:
                    z = torch.randint(-half, half, (out_f, n_g), generator=gen, dtype=torch.int8)
                    stored["weight_zero_point"] = pack_to_int32(z, bits, packed_dim=0)
                wargs = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy}
                if gs:
                    wargs["group_size"] = gs
                case = f"seed {seed} int{bits} {strategy} sym={sym} {out_f}x{in_f} scale {sdt}"
                run(f"pack-quantized int{bits}", case, "pack-quantized", wargs, stored, root / f"ctp-{k}")

    # unpacked codes with scales: FP8 E4M3 (float-quantized) and int8 (int-quantized), tensor/channel/group/block
    for seed in SEEDS:
        for kind, strategy, sym, out_f, in_f, extra in (
            ("fp8", "tensor", True, 10, 24, {}),
            ("fp8", "channel", True, 9, 31, {}),
            ("fp8", "group", True, 8, 48, {"group_size": 16}),
            ("fp8", "block", True, 10, 21, {"block_structure": [4, 8]}),  # partial edge blocks
            ("fp8", "block", True, 128 + 7, 128 + 70, {"block_structure": [128, 128]}),
            ("int8", "channel", True, 9, 30, {}),
            ("int8", "channel", False, 9, 30, {}),
            ("int8", "group", False, 6, 32, {"group_size": 8}),
            ("int8", "tensor", True, 5, 13, {}),
        ):
            k += 1
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            if kind == "fp8":
                raw = torch.randint(0, 256, (out_f, in_f), generator=gen, dtype=torch.uint8)
                raw[(raw & 0x7F) == 0x7F] = 0x3C  # drop E4M3's NaN encodings
                w = raw.view(torch.float8_e4m3fn)
                fmt = "float-quantized"
            else:
                w = torch.randint(-128, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
                fmt = "int-quantized"
            if strategy == "tensor":
                sshape: tuple[int, ...] = (1,)
            elif strategy == "channel":
                sshape = (out_f, 1)
            elif strategy == "group":
                sshape = (out_f, in_f // extra["group_size"])
            else:
                bh, bw = extra["block_structure"]
                sshape = (-(-out_f // bh), -(-in_f // bw))
            sdt = (torch.float32, torch.bfloat16)[k % 2]
            stored = {"weight": w, "weight_scale": _scales(gen, sshape, sdt)}
            if not sym:
                stored["weight_zero_point"] = torch.randint(-128, 128, sshape, generator=gen, dtype=torch.int8)
            wargs = {"num_bits": 8, "type": "float" if kind == "fp8" else "int", "symmetric": sym,
                     "strategy": strategy, **extra}  # fmt: skip
            case = f"seed {seed} {kind} {strategy} sym={sym} {out_f}x{in_f} scale {sdt}"
            run(f"{fmt} {kind}", case, fmt, wargs, stored, root / f"cts-{k}")


def ct_gidx(tally: Tally, root: Path) -> None:
    """Act-order ``weight_g_idx`` against compressed-tensors 0.12.x (``dequantize`` with ``g_idx``)."""
    import compressed_tensors
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    p = "model.layers.0.mlp.down_proj"
    for seed in SEEDS:
        for bits, out_f, in_f, gs in ((4, 12, 64, 16), (4, 7, 96, 32), (8, 5, 48, 8)):
            gen = torch.Generator().manual_seed(seed * 10 + bits + in_f)
            half = 1 << (bits - 1)
            q = torch.randint(-half, half, (out_f, in_f), generator=gen, dtype=torch.int8)
            n_g = in_f // gs
            g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=gen)].to(torch.int32)
            s = _scales(gen, (out_f, n_g), torch.bfloat16)
            stored = {
                "weight_packed": pack_to_int32(q, bits),
                "weight_scale": s,
                "weight_shape": torch.tensor([out_f, in_f]),
                "weight_g_idx": g_idx,
            }
            wargs = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": gs,
                     "actorder": "group"}  # fmt: skip
            folder = _save(root / f"ctg-{seed}-{bits}-{in_f}", {f"{p}.{k}": v for k, v in stored.items()},
                           _ct_cfg("pack-quantized", wargs))  # fmt: skip
            got = _read(folder, [f"{p}.weight"])[f"{p}.weight"]
            codes = unpack_from_int32(stored["weight_packed"], bits, torch.Size([out_f, in_f]))
            args = QuantizationArgs(**wargs)
            case = f"seed {seed} int{bits} {out_f}x{in_f} g{gs} act-order"
            label = f"ct pack-quantized g_idx vs compressed-tensors {compressed_tensors.__version__}"
            tally.add(f"{label} (bf16)", case, got, dequantize(codes, s, None, args, g_idx=g_idx))
            tally.add(f"{label} (scale as fp32)", case, got, dequantize(codes, s.float(), None, args, g_idx=g_idx))


# ---------------------------------------------------------------- GPTQ (GPTQModel / AutoGPTQ torch paths) and AWQ


def _pack_along_in(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(in, out) codes -> GPTQ qweight (in·bits/32 rows, out), input i in bits bits·(i mod 32/bits) of row i·bits/32
    (GPTQModel's ``pack``: ``qw[r] |= int_np[r * pack_factor + j] << (bits * j)``); in padded with zero codes."""
    per = 32 // bits
    rows = -(-q.shape[0] // per)
    padded = torch.zeros(rows * per, q.shape[1], dtype=torch.int64)
    padded[: q.shape[0]] = q.to(torch.int64)
    words = (padded.reshape(rows, per, -1) << (torch.arange(per) * bits).reshape(1, per, 1)).sum(1)
    return _wrap32(words)


def _wrap32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> the int32 words with those bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_along_out(z: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, out) -> (G, out·bits/32): column c in bits bits·(c mod 32/bits) of word c·bits/32 (GPTQModel's qzeros)."""
    return _pack_along_in(z.t(), bits).t().contiguous()


def _gptqmodel_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """gptqmodel/utils/model.py ``convert_gptq_v1_to_v2_format_module``: one int32 addition of 1 per field."""
    add = {
        2: 0b01010101010101010101010101010101,
        4: 0b00010001000100010001000100010001,
        8: 0b00000001000000010000000100000001,
    }
    return _wrap32(qzeros.to(torch.int64) + add[bits])  # int32 wrap-around


def _gptqmodel_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """gptqmodel/utils/model.py ``convert_gptq_v2_to_v1_format_module`` (how GPTQModel saves ``gptq``): the inverse."""
    sub = {
        2: 0b01010101010101010101010101010101,
        4: 0b00010001000100010001000100010001,
        8: 0b00000001000000010000000100000001,
    }
    return _wrap32(qzeros.to(torch.int64) - sub[bits])


def _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits: int, in_f: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``PackableQuantLinear.dequantize_weight`` (2/4/8 bits, num_itr 1): (in, out) in the scales' dtype. The unpacked
    rows are cut to in_features first, as the file's earlier revision did, so a padded last word works."""
    per, maxq = 32 // bits, (1 << bits) - 1
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    dq = torch.int16 if bits == 8 else torch.int8
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, per), wf.unsqueeze(0)).to(dq)
    zeros = torch.bitwise_and(zeros, maxq).reshape(scales.shape)
    weight = torch.bitwise_and(
        torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, per, -1), wf.unsqueeze(-1)).to(dq), maxq
    )
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])[:in_f]
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


def _autogptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, in_f: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """qlinear_cuda_old.py torch path (v1 zeros: masked, then plus one), indexed by g_idx as its act-order kernels."""
    per, maxq = 32 // bits, (1 << bits) - 1
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    dq = torch.int16 if bits == 8 else torch.int8
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, per), wf.unsqueeze(0)).to(dq)
    zeros = torch.bitwise_and(zeros, maxq) + 1
    zeros = zeros.reshape(scales.shape)
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, per, -1), wf.unsqueeze(-1)).to(dq)
    weight = torch.bitwise_and(weight, maxq).reshape(-1, qweight.shape[1])[:in_f]
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


def gptq(tally: Tally, root: Path) -> None:
    stem = "model.layers.0.mlp.up_proj"
    k = 0
    for seed in SEEDS:
        for bits, out_f, in_f, gs, gidx_mode in (
            (4, 16, 64, 16, "act-order"),
            (4, 24, 96, 32, "sequential"),
            (4, 8, 64, 16, "none"),  # no g_idx stored: g(i) = i // group_size
            (4, 16, 40, 8, "act-order"),  # 40 inputs: the last qweight word is half padding
            (4, 8, 48, -1, "none"),  # group_size −1: one group
            (8, 8, 48, 16, "act-order"),
            (2, 16, 64, 32, "sequential"),
        ):
            for ck in ("gptq", "gptq_v2"):
                k += 1
                gen = torch.Generator().manual_seed(seed * 1000 + k)
                maxq = (1 << bits) - 1
                n_g = -(-in_f // gs) if gs > 0 else 1
                q = torch.randint(0, maxq + 1, (in_f, out_f), generator=gen, dtype=torch.int32)
                # v1 stores zero − 1, so a real zero (1..maxq) is stored as 0..maxq−1; v2 stores it as it is
                zs = torch.randint(
                    0, maxq if ck == "gptq" else maxq + 1, (n_g, out_f), generator=gen, dtype=torch.int32
                )
                s = _scales(gen, (n_g, out_f), torch.float16)
                if gidx_mode == "act-order":
                    g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=gen)].to(torch.int32)
                else:
                    g_idx = (torch.arange(in_f) // gs if gs > 0 else torch.zeros(in_f, dtype=torch.int64)).to(
                        torch.int32
                    )
                qweight, qzeros = _pack_along_in(q, bits), _pack_along_out(zs, bits)
                sd = {f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": s}
                if gidx_mode != "none":
                    sd[f"{stem}.g_idx"] = g_idx
                cfg = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": gidx_mode == "act-order",
                       "sym": False, "checkpoint_format": ck}  # fmt: skip
                folder = _save(root / f"gptq-{k}", sd, cfg)
                got = _read(folder, [f"{stem}.weight"])[f"{stem}.weight"]
                case = f"seed {seed} {ck} int{bits} {out_f}x{in_f} g{gs} {gidx_mode}"
                v2 = _gptqmodel_v1_to_v2(qzeros, bits) if ck == "gptq" else qzeros
                for sdt in (torch.float16, torch.float32):
                    ref = _gptqmodel_dequantize(qweight, v2, s.to(sdt), g_idx, bits, in_f).t()
                    tag = "fp16" if sdt == torch.float16 else "scale as fp32"
                    tally.add(f"{ck} vs GPTQModel dequantize_weight ({tag})", case, got, ref)
                if ck == "gptq":
                    ref = _autogptq_dequantize(qweight, qzeros, s.float(), g_idx, bits, in_f).t()
                    tally.add("gptq vs AutoGPTQ torch path (scale as fp32)", case, got, ref)
    # v1 as GPTQModel writes asymmetric zeros (v2 words minus a 1 per field, one 32-bit subtraction): a true zero
    # of 0 is stored as all ones and borrows from the next field. AutoGPTQ's per-field "+ 1" reads those fields
    # differently (maxq + 1, and the neighbour one too low): the two references disagree there
    for seed in SEEDS:
        for bits in (2, 4, 8):
            maxq = (1 << bits) - 1
            gen = torch.Generator().manual_seed(7000 + 10 * seed + bits)
            in_f, out_f, gs = 64, 32, 16
            q = torch.randint(0, maxq + 1, (in_f, out_f), generator=gen, dtype=torch.int32)
            z2 = torch.randint(0, maxq + 1, (in_f // gs, out_f), generator=gen, dtype=torch.int32)
            z2[:, ::3] = 0  # plenty of true zeros of 0
            s = _scales(gen, (in_f // gs, out_f), torch.float16)
            g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=gen)].to(torch.int32)
            qweight = _pack_along_in(q, bits)
            qzeros = _gptqmodel_v2_to_v1(_pack_along_out(z2, bits), bits)
            sd = {f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": s, f"{stem}.g_idx": g_idx}
            cfg = {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": False, "desc_act": True,
                   "checkpoint_format": "gptq"}  # fmt: skip
            folder = _save(root / f"gptq-v1-asym-{seed}-{bits}", sd, cfg)
            got = _read(folder, [f"{stem}.weight"])[f"{stem}.weight"]
            case = f"seed {seed} int{bits} {out_f}x{in_f} g{gs} act-order, true zeros 0..{maxq}"
            v2 = _gptqmodel_v1_to_v2(qzeros, bits)
            ref = _gptqmodel_dequantize(qweight, v2, s, g_idx, bits, in_f).t()
            tally.add("gptq v1 asym (GPTQModel-written) vs GPTQModel (fp16)", case, got, ref)
            ref = _gptqmodel_dequantize(qweight, v2, s.float(), g_idx, bits, in_f).t()
            tally.add("gptq v1 asym (GPTQModel-written) vs GPTQModel (scale as fp32)", case, got, ref)
            ref = _autogptq_dequantize(qweight, qzeros, s.float(), g_idx, bits, in_f).t()
            tally.add("gptq v1 asym (GPTQModel-written) vs AutoGPTQ (scale as fp32)", case, got, ref)


def _load_by_path(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def awq(tally: Tally, root: Path, packing_utils: Path) -> None:
    pu = _load_by_path(packing_utils)
    dequantize_gemm: Callable[..., torch.Tensor] = pu.dequantize_gemm
    order = pu.AWQ_ORDER  # AutoAWQ's packer puts logical column 8k + AWQ_ORDER[j] into nibble j of word k
    stem = "model.layers.0.self_attn.o_proj"

    def pack(m: torch.Tensor) -> torch.Tensor:
        """(rows, 8·n) -> (rows, n) int32, AutoAWQ's ``WQLinear_GEMM.from_linear`` order."""
        cols = torch.arange(m.shape[1]).reshape(-1, 8)[:, order].reshape(-1)
        return _pack_along_out(m[:, cols], 4)

    k = 0
    for seed in SEEDS:
        for out_f, in_f, gs in ((16, 64, 16), (24, 96, 32), (8, 128, 128), (40, 48, 16)):
            k += 1
            gen = torch.Generator().manual_seed(seed * 100 + k)
            n_g = in_f // gs
            q = torch.randint(0, 16, (in_f, out_f), generator=gen, dtype=torch.int32)
            z = torch.randint(0, 16, (n_g, out_f), generator=gen, dtype=torch.int32)
            s = _scales(gen, (n_g, out_f), torch.float16)
            qweight, qzeros = pack(q), pack(z)
            sd = {f"{stem}.qweight": qweight, f"{stem}.qzeros": qzeros, f"{stem}.scales": s}
            cfg = {"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm", "zero_point": True}
            folder = _save(root / f"awq-{k}", sd, cfg)
            got = _read(folder, [f"{stem}.weight"])[f"{stem}.weight"]
            case = f"seed {seed} {out_f}x{in_f} g{gs}"
            assert torch.equal(pu.reverse_awq_order(*pu.unpack_awq(qweight, qzeros, 4), 4)[0] & 0xF, q.to(torch.int8))
            tally.add(
                "awq gemm vs AutoAWQ dequantize_gemm (fp16)", case, got, dequantize_gemm(qweight, qzeros, s, 4, gs).t()
            )
            ref32 = dequantize_gemm(qweight, qzeros, s.float(), 4, gs).t()
            tally.add("awq gemm vs AutoAWQ dequantize_gemm (scale as fp32)", case, got, ref32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="mxfp4,ct,gptq,awq", help="comma-separated: mxfp4, ct, ct-gidx, gptq, awq")
    ap.add_argument("--autoawq", type=Path, help="AutoAWQ's awq/utils/packing_utils.py (from the 0.2.9 sdist)")
    a = ap.parse_args()
    only = set(a.only.split(","))
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "mxfp4" in only:
            mxfp4(tally, root)
        if "ct" in only:
            ct(tally, root)
        if "ct-gidx" in only:
            ct_gidx(tally, root)
        if "gptq" in only:
            gptq(tally, root)
        if "awq" in only:
            if a.autoawq is None:
                print("awq: skipped (pass --autoawq PATH to AutoAWQ's packing_utils.py)")
            else:
                awq(tally, root, a.autoawq)
    tally.print()


if __name__ == "__main__":
    main()
