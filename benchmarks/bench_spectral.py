"""Per-matrix cost of `spectral` (full-spectrum NSS + top-k angles, fp64): the SVD routes before and after.

Before: ``svdvals(ΔW)`` for ‖ΔW‖₂ plus one full ``torch.linalg.svd`` per side. After (CPU): ‖ΔW‖₂ from the largest
eigenvalue of the Gram matrix (linalg.top_singular_value) and, for rectangular sides, QR of the long side first,
SVD of the square factor and only k vectors mapped back (linalg.spectrum_topk). Both are exact; the script prints
the seconds per matrix of each route and of each piece, and the largest relative difference over every
SpectralResult field. The "before" route is the library code with the two routes switched back (patched here).

    python benchmarks/bench_spectral.py                              # 7B shapes scaled down 2x, 1 repeat
    python benchmarks/bench_spectral.py --shapes 4096x11008 --scale 1 --threads 1

7B shapes: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch

from ckptdiff.metrics import linalg
from ckptdiff.metrics import spectral as spectral_mod

SHAPES_7B = ["4096x4096", "4096x11008", "11008x4096"]


@contextlib.contextmanager
def before_routes() -> Iterator[None]:
    """The pre-change routes: svdvals for ‖ΔW‖₂, a full LAPACK SVD per side whatever the aspect ratio."""
    ratio, top = linalg.QR_FIRST_RATIO, spectral_mod.top_singular_value
    linalg.QR_FIRST_RATIO = math.inf
    spectral_mod.top_singular_value = lambda a, dt=torch.float64: torch.linalg.svdvals(a.to(dt))[..., 0]
    try:
        yield
    finally:
        linalg.QR_FIRST_RATIO, spectral_mod.top_singular_value = ratio, top


def pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 with a power-law spectrum plus noise, W1 = W0 + a small dense update; (1, m, n) fp64 each."""
    g = torch.Generator().manual_seed(seed)
    r = min(256, m, n)
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    a = torch.randn(m, r, generator=g, dtype=torch.float64) / m**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64) / n**0.5
    w0 = (a * s) @ b.mT
    w0 = 0.02 * (w0 / w0.std() + 0.5 * torch.randn(m, n, generator=g, dtype=torch.float64))
    w1 = w0 + 1e-3 * w0.std() * torch.randn(m, n, generator=g, dtype=torch.float64)
    return w0[None], w1[None]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds over ``repeats`` runs and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES_7B, help="MxN shapes before --scale")
    p.add_argument("--scale", type=int, default=2, help="divide both sides by this (1 = real size)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--pieces", action="store_true", help="also time each SVD piece alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"## spectral per matrix, fp64 CPU, k={args.k}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    note = "real 7B size" if args.scale == 1 else f"7B shapes scaled down {args.scale}x per side"
    print(f"{note}; medians of {args.repeats}; load before: {load()}\n")
    print("| shape | before (s) | after (s) | speed-up | max rel. difference |")
    print("|---|---|---|---|---|")
    pieces: list[str] = []
    for spec in args.shapes:
        m, n = (int(x) // args.scale for x in spec.split("x"))
        w0, w1 = pair(m, n)

        def run(w0: torch.Tensor = w0, w1: torch.Tensor = w1) -> list[spectral_mod.SpectralResult]:
            return spectral_mod.spectral_metrics(w0, w1, args.k, dtype=torch.float64)

        with before_routes():
            t_before, ref = timed(run, args.repeats)
        t_after, new = timed(run, args.repeats)
        worst, field = 0.0, ""
        for a, b in zip(new, ref, strict=True):  # type: ignore[call-overload]
            for key, x in asdict(a).items():
                y = asdict(b)[key]
                if isinstance(x, float) and not (math.isnan(x) and math.isnan(y)):
                    rel = abs(x - y) / max(abs(y), 1e-300)
                    worst, field = max((worst, field), (rel, key))
        speed = t_before / t_after
        print(f"| {m}x{n} | {t_before:.2f} | {t_after:.2f} | {speed:.2f}x | {worst:.1e} ({field}) |", flush=True)
        if args.pieces:
            d = w1 - w0
            cases: list[tuple[str, Callable[[], object]]] = [
                ("svdvals(ΔW)", lambda d=d: torch.linalg.svdvals(d)),
                ("Gram + eigvalsh σ_max(ΔW)", lambda d=d: linalg.top_singular_value(d)),
                ("full SVD of one side", lambda w=w0: torch.linalg.svd(w, full_matrices=False)),
                ("spectrum_topk of one side", lambda w=w0: linalg.spectrum_topk(w, args.k)),
            ]
            for label, fn in cases:
                t, _ = timed(fn, args.repeats)
                pieces.append(f"| {m}x{n} | {label} | {t:.2f} |")
    print(f"\nload after: {load()}")
    if pieces:
        print("\n| shape | piece | seconds |\n|---|---|---|")
        print("\n".join(pieces))


if __name__ == "__main__":
    main()
