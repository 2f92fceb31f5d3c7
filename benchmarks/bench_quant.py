"""Throughput of `sparsity` on quantized checkpoints (dequantized on the fly) against bf16 checkpoints of the same
logical size, side by side in one run.

Each format gets a pair of random stored tensors in its real layout (the values do not matter for speed), with
``--entries`` logical weight entries per side, and fp32 and bf16 pairs of the same logical shapes as baselines (a
dequantized weight is compared as fp32, so the fp32 pair is what the comparison alone costs). Each pair runs
``ckptdiff.sparsity`` ``--repeats`` times, alternating; the table gives median seconds, logical entries per second,
and the ratios to the baselines.

    python benchmarks/bench_quant.py --entries 33554432 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptdiff


def _save(folder: Path, sd: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps({"quantization_config": config}))
    return folder


def build(root: Path, fmt: str, entries: int, seed: int) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """A checkpoint of ``fmt`` with about ``entries`` logical entries; its logical shapes (name -> shape)."""
    g = torch.Generator().manual_seed(seed)
    out, inp = 4096, max(128, entries // 4096 // 128 * 128)
    rnd8 = lambda *s: torch.randint(0, 256, s, generator=g, dtype=torch.uint8)  # noqa: E731
    rnd32 = lambda *s: torch.randint(-(2**31), 2**31 - 1, s, generator=g, dtype=torch.int32)  # noqa: E731
    if fmt == "mxfp4":
        e, rows, groups = max(1, entries // (2880 * 2880)), 2880, 90
        p = "model.layers.0.mlp.experts.down_proj"
        sd = {
            p + "_blocks": rnd8(e, rows, groups, 16),
            p + "_scales": torch.randint(120, 130, (e, rows, groups), generator=g, dtype=torch.uint8),
        }
        return _save(root, sd, {"quant_method": "mxfp4"}), {p: (e, groups * 32, rows)}
    p = "model.layers.0.mlp.up_proj"
    if fmt == "ct-int4":
        sd = {
            p + ".weight_packed": rnd32(out, inp // 8),
            p + ".weight_scale": torch.rand(out, inp // 128, generator=g),
            p + ".weight_shape": torch.tensor([out, inp]),
        }
        w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
        cfg = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "weights": w}},
        }
        return _save(root, sd, cfg), {p + ".weight": (out, inp)}
    if fmt == "bnb-nf4":
        n = out * inp
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, inp]}
        sd = {
            p + ".weight": rnd8(n // 2, 1),
            p + ".weight.absmax": torch.rand(n // 64, generator=g),
            p + ".weight.quant_map": torch.linspace(-1, 1, 16),
            p + ".weight.quant_state.bitsandbytes__nf4": torch.frombuffer(
                bytearray(json.dumps(state).encode()), dtype=torch.uint8
            ),
        }
        return _save(root, sd, {"quant_method": "bitsandbytes", "load_in_4bit": True}), {p + ".weight": (out, inp)}
    if fmt == "gptq":
        sd = {
            p + ".qweight": rnd32(inp // 8, out),
            p + ".qzeros": rnd32(inp // 128, out // 8),
            p + ".scales": torch.rand(inp // 128, out, generator=g).half(),
        }
        return _save(root, sd, {"quant_method": "gptq", "bits": 4, "group_size": 128}), {p + ".weight": (out, inp)}
    raise ValueError(fmt)


def plain_like(root: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(seed)
    return _save(root, {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}, None)


def timed(base: Path, ft: Path) -> float:
    t = time.perf_counter()
    ckptdiff.sparsity(base, ft, progress=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1 << 25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="*", default=["mxfp4", "ct-int4", "bnb-nf4", "gptq"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        "| format | logical entries/side | quantized s | fp32 s | bf16 s | quantized M entries/s | vs fp32 | vs bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for fmt in args.formats:
            qb, shapes = build(root / fmt / "b", fmt, args.entries, 1)
            qf, _ = build(root / fmt / "f", fmt, args.entries, 2)
            bb, bf = (plain_like(root / fmt / f"b{k}", shapes, k, torch.bfloat16) for k in (1, 2))
            fb, ff = (plain_like(root / fmt / f"f{k}", shapes, k, torch.float32) for k in (1, 2))
            n = sum(int(torch.tensor(s).prod()) for s in shapes.values())
            tq, tf, tb = [], [], []
            for _ in range(args.repeats):
                tq.append(timed(qb, qf))
                tf.append(timed(fb, ff))
                tb.append(timed(bb, bf))
            mq, mf, mb = (statistics.median(t) for t in (tq, tf, tb))
            print(
                f"| {fmt} | {n:,} | {mq:.2f} | {mf:.2f} | {mb:.2f} | {n / mq / 1e6:.1f} | {mq / mf:.1f}x "
                f"| {mq / mb:.1f}x |"
            )


if __name__ == "__main__":
    main()
