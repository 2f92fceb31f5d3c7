"""Benchmark the bitwise sparsity kernel: the numpy path against the compiled (numba) path, in memory.

A random bf16 pair of N MiB per side, about 20% of the entries moved by 1-40 ULPs (options change both), is
counted chunk by chunk (as `ckptdiff sparsity` streams it) by each path in turn, in one process, torch on one
thread. With --max-ulps 1 no move leaves the numpy path's fast case (moves of at most 16 ULPs).
Prints the median wall time of the repeats and the throughput over both sides' bytes, after checking that
both paths give identical counts. The first (compiling or cache-loading) call is made before timing.

    python benchmarks/bench_kernel.py --mib 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ckptdiff.metrics import sparsity as sp


def make_pair(mib: float, changed: float, max_ulps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (base, fine-tune) of `mib` MiB each; a `changed` fraction moved by 1..`max_ulps` ULPs either way."""
    rng = np.random.default_rng(seed)
    n = int(mib * 2**20) // 2
    bits = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32) >> 16  # truncated to bf16 bits
    sign, mag = bits & 0x8000, (bits & 0x7FFF).astype(np.int64)
    moved = rng.random(n) < changed
    steps = rng.integers(1, max_ulps + 1, int(moved.sum())) * rng.choice(np.array([-1, 1]), int(moved.sum()))
    up = mag[moved] + steps
    mag[moved] = np.where(up < 0, mag[moved] - steps, up)  # moved the other way rather than past zero
    ft = sign | mag.astype(np.uint32)
    as_bf16 = [torch.from_numpy(x.astype(np.uint16).view(np.int16)).view(torch.bfloat16) for x in (bits, ft)]
    return as_bf16[0], as_bf16[1]


def run_chunks(fn: Callable[[torch.Tensor, torch.Tensor], sp.ChangeCounts], w0, w1, chunk: int) -> sp.ChangeCounts:
    total = sp.ChangeCounts()
    for s in range(0, w0.numel(), chunk):
        total = total + fn(w0[s : s + chunk], w1[s : s + chunk])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=256, help="MiB per side (default 256)")
    ap.add_argument("--changed", type=float, default=0.2, help="fraction of entries changed (default 0.2)")
    ap.add_argument("--max-ulps", type=int, default=40, help="largest move in ULPs (default 40)")
    ap.add_argument("--chunk-mib", type=float, default=16, help="MiB per side per call, as streamed (default 16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w0, w1 = make_pair(args.mib, args.changed, args.max_ulps)
    chunk = max(1, int(args.chunk_mib * 2**20) // 2)
    paths: dict[str, Callable[[torch.Tensor, torch.Tensor], sp.ChangeCounts]] = {"numpy": sp._bitwise_counts_numpy}
    kernels = sp._compiled_kernels()
    if kernels is None:
        print("numba unavailable (or CKPTDIFF_NO_NUMBA set): timing the numpy path only")
    else:
        t = time.perf_counter()
        kernels.bitwise_counts(*(np.zeros(1, np.uint16),) * 2, *sp._KERNEL_ARGS[torch.bfloat16])
        print(f"first compiled call (compile or cache load): {time.perf_counter() - t:.2f} s")
        paths["numba"] = lambda a, b: sp._bitwise_counts_compiled(kernels, a, b)
    nbytes = 2 * w0.numel() * w0.element_size()
    results = {}
    for name, fn in paths.items():
        results[name] = run_chunks(fn, w0, w1, chunk)  # warm-up, and the answer to compare
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_chunks(fn, w0, w1, chunk)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{name:6s} median {med * 1e3:8.1f} ms  {nbytes / med / 1e9:6.2f} GB/s  (min {min(times) * 1e3:.1f} ms)")
    first = next(iter(results.values()))
    assert all(r == first for r in results.values()), results
    print(f"counts: {first}")


if __name__ == "__main__":
    main()
