"""`sparsity` on an fp32 pair, whose bf16 view (what a bf16 copy would see change) is counted beside the native
counts, against the same pair with the --as overflow masks computed on every chunk (the code before the min/max
shortcut in ckptdiff.metrics.mask.overflowed), and a bf16 pair of the same shape as the floor.

    python benchmarks/bench_fp32_view.py --n 4096 --repeats 7

Library calls as a notebook makes them, one process, the cases alternating; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptdiff
from ckptdiff.metrics import mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="one n x n matrix per side")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.n, args.n, generator=g)
    f = w.clone()
    idx = torch.randperm(w.numel(), generator=g)[: w.numel() // 50]
    f.view(-1)[idx] += 1e-3  # 2% of the entries moved
    name = "model.layers.0.mlp.up_proj.weight"
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            paths[label] = (Path(d) / f"b-{label}.safetensors", Path(d) / f"f-{label}.safetensors")
            save_file({name: w.to(dtype)}, str(paths[label][0]))
            save_file({name: f.to(dtype)}, str(paths[label][1]))
        shortcut = mask._surely_finite

        def run(label: str, full_masks: bool = False) -> float:
            mask._surely_finite = (lambda t: False) if full_masks else shortcut  # type: ignore[assignment]
            try:
                t = time.perf_counter()
                ckptdiff.sparsity(*map(str, paths[label]), progress=False)
                return time.perf_counter() - t
            finally:
                mask._surely_finite = shortcut

        cases = {
            "fp32, overflow masks on every chunk (before)": lambda: run("fp32", True),
            "fp32, min/max shortcut (now)": lambda: run("fp32"),
            "bf16 (no second view)": lambda: run("bf16"),
        }
        for c in cases.values():
            c()  # warm: imports, the compiled kernel, the page cache
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for k, c in cases.items():
                times[k].append(c())
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["fp32, overflow masks on every chunk (before)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{args.n} x {args.n} per side, 2% of entries moved; medians of {args.repeats}\n")
    print("| run | wall s (median) | vs before |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / ref:.2f}x |")


if __name__ == "__main__":
    main()
