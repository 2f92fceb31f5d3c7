"""Benchmark the SVD machinery of ckptdiff.metrics.linalg on a 7B-like block, and the top-α mask selection.

Compares per-matrix exact vs batched exact vs randomized top-k vs svdvals-only, fp32 vs fp64 (time per matrix,
peak memory, principal-mask agreement with exact), then torch.topk vs torch.kthvalue vs torch.sort vs radix select
(what ckptdiff uses) vs np.partition for picking the top α·m·n entries. Prints Markdown to stdout.

    python benchmarks/bench_svd.py                      # CPU, 7B shapes scaled down 4x per side
    python benchmarks/bench_svd.py --device cuda --scale 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from ckptdiff.metrics import linalg
from ckptdiff.metrics.principal import kth_smallest_key, mask_size, rank_k_magnitude, select_mask

# A LLaMA-7B block: q/k/v/o are 4096x4096, gate/up are 11008x4096, down is 4096x11008 (same cost as its transpose).
_LIBC = ctypes.CDLL("libc.so.6")

BLOCK = [((4096, 4096), 4), ((11008, 4096), 3)]


def realistic(m: int, n: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """A (count, m, n) bf16 stack: power-law spectrum (σ_i ∝ i^-0.5 over 256 directions) plus Gaussian noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = min(256, m, n)
    s = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.5
    a = torch.randn(count, m, r, generator=g, device=device) / m**0.5  # (count, m, r)
    b = torch.randn(count, n, r, generator=g, device=device) / n**0.5  # (count, n, r)
    w = (a * s) @ b.mT  # (count, m, n)
    w = w / w.std() + 0.5 * torch.randn(count, m, n, generator=g, device=device)
    return (0.02 * w).to(torch.bfloat16)


class PeakMemory:
    """Peak memory above the starting level during a block: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self, start: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - start)
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            _LIBC.malloc_trim(0)  # hand freed heap back to the OS so RSS growth measures this block
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, int, object]:
    """Median seconds over ``repeats`` runs, peak memory of the last run, and the last result."""
    times = []
    peak = 0
    out: object = None
    for _ in range(repeats):
        out = None
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = mem.peak
    return statistics.median(times), peak, out


def principal_agreement(w: torch.Tensor, ref: linalg.TopK, top: linalg.TopK, alpha: float) -> float:
    """Smallest fraction of the exact principal mask that ``top`` reproduces, over the stack."""
    count = mask_size(alpha, w[0].numel())
    worst = 1.0
    for i in range(w.shape[0]):
        a = select_mask(rank_k_magnitude(ref.u[i], ref.s[i], ref.v[i]), count, largest=True)
        b = select_mask(rank_k_magnitude(top.u[i], top.s[i], top.v[i]), count, largest=True)
        worst = min(worst, int((a & b).sum()) / count)
    return worst


def shape_rows(w: torch.Tensor, dtype: torch.dtype, args: argparse.Namespace, device: torch.device) -> list[str]:
    """Markdown rows for one (count, m, n) stack in one computation dtype."""
    count, m, n = w.shape
    name = "fp32" if dtype == torch.float32 else "fp64"
    k, reps = args.k, args.repeats

    def plan(work: linalg.Work, b: int) -> str:
        per = linalg.workspace_bytes((m, n), w.dtype, dtype, work=work, k=k, device_type=w.device.type)
        return f"{b * per / 2**20:.0f}"

    def row(b: int, method: str, t: float, mem: int, work: linalg.Work, agree: str) -> str:
        return (
            f"| {m}x{n} | {b} | {name} | {method} | {t / count:.3f} | {mem / 2**20:.0f} | {plan(work, b)} | {agree} |"
        )

    t, mem, exact = timed(lambda: linalg.exact_topk(w, k, dtype=dtype), device, reps)
    assert isinstance(exact, linalg.TopK)
    rows = [row(count, "exact, batched", t, mem, "svd", "1 (reference)")]
    t, mem, _ = timed(lambda: [linalg.exact_topk(x, k, dtype=dtype) for x in w], device, reps)
    rows.append(row(1, "exact, per matrix", t, mem, "svd", "1"))
    t, mem, rnd = timed(lambda: linalg.randomized_topk(w, k, dtype=dtype), device, reps)
    assert isinstance(rnd, linalg.TopK)
    agree = principal_agreement(w, exact, rnd, args.alpha)
    rows.append(row(count, f"{rnd.describe()}, batched", t, mem, "randomized", f"{agree:.4f}"))
    t, mem, _ = timed(lambda: linalg.svdvals(w, dtype), device, reps)
    rows.append(row(count, "svdvals only, batched", t, mem, "svdvals", "-"))
    return rows


def svd_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Markdown rows: one per (shape, dtype, method)."""
    rows = [
        "| shape | b | dtype | method | s/matrix | peak MiB (measured) | planner MiB | mask agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (m0, n0), count in BLOCK:
        w = realistic(m0 // args.scale, n0 // args.scale, count, 0, device)  # (count, m, n)
        for dtype in (torch.float32, torch.float64):
            rows += shape_rows(w, dtype, args, device)
    return rows


def selection_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Markdown rows: top-α selection methods on |W0^(k)| of one matrix."""
    m, n = args.select_shape
    w = realistic(m, n, 1, 1, device)  # (1, m, n)
    top = linalg.topk(w, args.k, method="randomized")
    score = rank_k_magnitude(top.u[0], top.s[0], top.v[0]).reshape(-1)  # (m n,)
    count = mask_size(args.alpha, score.numel())
    keys = score.view(torch.int32)
    rank = score.numel() - count
    truth = float(torch.sort(score).values[rank])
    cases: list[tuple[str, Callable[[], float]]] = [
        (
            "radix select on bit patterns (ckptdiff)",
            lambda: float(keys.new_tensor(kth_smallest_key(keys, rank, 32)).view(torch.float32)),
        ),
        ("full select_mask (radix + exact ties)", lambda: float(score[select_mask(score, count, largest=True)].min())),
        ("torch.kthvalue", lambda: float(torch.kthvalue(score, rank + 1).values)),
        ("torch.topk", lambda: float(torch.topk(score, count).values.min())),
        ("torch.sort", lambda: float(torch.sort(score).values[rank])),
    ]
    if device.type == "cpu":
        cases.append(("np.partition (CPU only)", lambda: float(np.partition(score.numpy(), rank)[rank])))
    rows = [f"| top-α threshold on {m}x{n}, α={args.alpha} | seconds | correct |", "|---|---|---|"]
    for label, fn in cases:
        t, _, value = timed(fn, device, args.repeats)
        rows.append(f"| {label} | {t:.3f} | {value == truth} |")
    return rows


def main() -> None:
    """Parse flags, run both tables, print Markdown."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", type=int, default=4, help="divide both 7B matrix sides by this (1 = real size)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--select-shape", type=int, nargs=2, default=(4096, 4096))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"## SVD benchmark ({hw}, torch {torch.__version__})\n")
    shapes = ", ".join(f"{m // args.scale}x{n // args.scale} x{c}" for (m, n), c in BLOCK)
    scale_note = "real 7B size" if args.scale == 1 else f"7B shapes scaled down {args.scale}x per side"
    print(f"Block: {shapes} ({scale_note}); k={args.k}, α={args.alpha}; medians of {args.repeats} runs; bf16 inputs")
    print("with a power-law spectrum plus noise. Peak memory: CUDA allocator peak, or sampled RSS growth on CPU;")
    print("planner = b x linalg.workspace_bytes (its own estimate, which should be >= measured).\n")
    for row in svd_table(args, device):
        print(row)
    print()
    for row in selection_table(args, device):
        print(row)


if __name__ == "__main__":
    main()
