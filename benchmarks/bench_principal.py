"""Randomized vs exact top-k for `principal-overlap`: the whole library call, and where its time goes.

Builds a bf16 pair of ``--matrices`` square matrices (power-law spectrum plus noise, about 20% of the entries
changed by a small step), then times ``ckptdiff.principal_overlap(..., svd=randomized|exact)`` in this one process,
interleaved so that load drifts hit both alike, and reports medians and their ratio with the load average.
``--cli`` times the whole ``python -m ckptdiff principal-overlap`` process instead of the library call.
``--profile`` adds a cProfile of one randomized call (top entries by own time); ``--agree N`` the principal-mask
agreement of randomized vs exact on the first N matrices (one exact SVD each, untimed). OpenMP threads wait
passively (OMP_WAIT_POLICY=PASSIVE, as the CLI sets it) unless ``--spin``.

    python benchmarks/bench_principal.py                        # 4 x 4096^2, k=64: randomized 3x, exact 1x
    python benchmarks/bench_principal.py --profile --exact-repeats 0
    python benchmarks/bench_principal.py --threads 1 --agree 1
    python benchmarks/bench_principal.py --size 1024 --repeats 3 --exact-repeats 3   # quick

On a shared machine the exact SVD's threads stall on each other (LAPACK barriers) far more than the randomized
path's matmuls do, which inflates the ratio; ``--threads 1`` gives the flop-bound ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--spin" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ckptdiff.cli.main does; before torch loads

import torch
from safetensors.torch import save_file


def make_pair(folder: Path, size: int, count: int, seed: int = 0) -> tuple[str, str]:
    """``count`` bf16 size x size matrices, sigma_i ~ i^-0.5 over 256 directions plus noise; ~20% entries moved."""
    g = torch.Generator().manual_seed(seed)
    r = min(256, size)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    base, ft = {}, {}
    for i in range(count):
        a = torch.randn(size, r, generator=g) / size**0.5
        b = torch.randn(size, r, generator=g) / size**0.5
        w = (a * s) @ b.mT  # (size, size), decaying spectrum
        w = 0.02 * (w / w.std() + 0.5 * torch.randn(size, size, generator=g))
        w0 = w.bfloat16()
        moved = torch.rand(size, size, generator=g) < 0.2
        w1 = torch.where(moved, (w + 0.002 * torch.randn(size, size, generator=g)).bfloat16(), w0)
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        base[name], ft[name] = w0, w1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    save_file(ft, str(folder / "ft.safetensors"))
    return str(folder / "base.safetensors"), str(folder / "ft.safetensors")


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def agreement(base: str, k: int, count: int) -> list[float]:
    """|principal_randomized ∩ principal_exact| / |principal| for the first ``count`` matrices (library pieces)."""
    from safetensors.torch import load_file

    from ckptdiff.metrics import linalg
    from ckptdiff.metrics.principal import region_masks

    out = []
    for w0 in list(load_file(base).values())[:count]:
        ex = linalg.topk(w0, k, method="exact")
        rnd = linalg.topk(w0, k, method="randomized")
        a = region_masks(w0, ex.u[0], ex.s[0], ex.v[0], 0.5).principal
        b = region_masks(w0, rnd.u[0], rnd.s[0], rnd.v[0], 0.5).principal
        out.append(int((a & b).sum()) / int(a.sum()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--matrices", type=int, default=4)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="randomized runs")
    p.add_argument("--exact-repeats", type=int, default=1, help="exact runs (0: skip exact)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--profile", action="store_true", help="cProfile one randomized call")
    p.add_argument("--agree", type=int, default=0, help="mask agreement on the first N matrices")
    p.add_argument("--data", type=Path, default=None, help="folder for the pair (reused if present)")
    p.add_argument("--cli", action="store_true", help="time the CLI process instead of the library call")
    p.add_argument("--spin", action="store_true", help="leave OMP_WAIT_POLICY alone (OpenMP's spinning default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import ckptdiff

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        if (folder / "ft.safetensors").exists():
            base, ft = str(folder / "base.safetensors"), str(folder / "ft.safetensors")
        else:
            base, ft = make_pair(folder, args.size, args.matrices)

        def call(method: str) -> float:
            t0 = time.perf_counter()
            if args.cli:
                env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
                cmd = [sys.executable, "-m", "ckptdiff", "principal-overlap", base, ft, "--k", str(args.k)]
                cmd += ["--svd", method, "--device", "cpu", "--quiet", "--format", "csv"]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            else:
                ckptdiff.principal_overlap(base, ft, k=args.k, svd=method, device="cpu", progress=False)
            return time.perf_counter() - t0

        what = "the CLI process" if args.cli else "the library call"
        wait = os.environ.get("OMP_WAIT_POLICY", "default")
        print(f"## principal-overlap, {args.matrices} x {args.size}^2 bf16, k={args.k}: {what}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait}")
        print(f"load before: {load()}\n")
        call("randomized")  # warm-up: imports, page cache
        times: dict[str, list[float]] = {"randomized": [], "exact": []}
        for r in range(max(args.repeats, args.exact_repeats)):
            if r < args.repeats:
                times["randomized"].append(call("randomized"))
            if r < args.exact_repeats:
                times["exact"].append(call("exact"))
        print("| svd | runs (s) | median (s) |")
        print("|---|---|---|")
        for method, ts in times.items():
            if ts:
                runs = ", ".join(f"{t:.2f}" for t in ts)
                print(f"| {method} | {runs} | {statistics.median(ts):.2f} |")
        if times["exact"]:
            ratio = statistics.median(times["exact"]) / statistics.median(times["randomized"])
            print(f"\nexact / randomized: {ratio:.1f}x")
        print(f"load after: {load()}")

        if args.agree:
            agree = agreement(base, args.k, args.agree)
            print(f"\nprincipal-mask agreement, randomized vs exact: {', '.join(f'{a:.4f}' for a in agree)}")

        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            t = call("randomized")
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
            body = text.getvalue()
            print(f"\n### cProfile of one randomized call ({t:.2f} s, load {load()})\n")
            print(body[body.index("ncalls") :].rstrip())


if __name__ == "__main__":
    main()
