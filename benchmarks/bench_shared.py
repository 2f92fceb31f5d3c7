"""Issue 26's figures in one command: one shared SVD per matrix, the guarded fast top-k path, randomized principal.

    python benchmarks/bench_shared.py                  # the default sizes (a few minutes on a quiet 2-core machine)
    python benchmarks/bench_shared.py --sizes 512 1024 4096 --repeats 3

Three tables, each case measured side by side in this one process (interleaved, so a load drift hits every case
alike), medians over ``--repeats``; the library is called as a notebook user calls it (no environment variables),
and the CLI as a user types it (``python -m ckptdiff``, one process per run, start-up included):

1. ``report`` (sparsity + principal-overlap + spectral in one pass) against the sum of the three single commands on
   the same pair: library and CLI. Target: at most 0.7x.
2. ``spectral`` per matrix at each ``--sizes`` (square, fp32, k = 64), ``--svd exact`` against the default ``auto``
   on two spectra: a decaying one (σ_i ~ i^-1: the fast path's check passes) and a Gaussian matrix's flat one (the
   check fails and each matrix is decomposed exactly after the try); the header's route counts are printed.
3. ``principal-overlap --svd randomized`` against ``--svd exact``, whole process (CLI) and library call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ckptdiff, for the library calls as for the CLI ones


def llama_pair(folder: Path, layers: int, d: int, seed: int = 0) -> tuple[str, str]:
    """A Llama-shaped bf16 pair; the fine-tune moves about 20% of every matrix by a small random step."""
    g = torch.Generator().manual_seed(seed)
    ff = int(d * 2.6875)
    base: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q", "k", "v", "o"):
            base[f"{p}.self_attn.{m}_proj.weight"] = torch.randn(d, d, generator=g) / d**0.5
        base[f"{p}.mlp.gate_proj.weight"] = torch.randn(ff, d, generator=g) / d**0.5
        base[f"{p}.mlp.up_proj.weight"] = torch.randn(ff, d, generator=g) / d**0.5
        base[f"{p}.mlp.down_proj.weight"] = torch.randn(d, ff, generator=g) / ff**0.5
        base[f"{p}.input_layernorm.weight"] = torch.ones(d)
    return _save_pair(folder, "llama", {k: v.bfloat16() for k, v in base.items()}, g)


def _save_pair(folder: Path, stem: str, base: dict[str, torch.Tensor], g: torch.Generator) -> tuple[str, str]:
    ft = {}
    for k, v in base.items():
        step = torch.randn(v.shape, generator=g) * 1e-3 * (torch.rand(v.shape, generator=g) < 0.2)
        ft[k] = (v.float() + step * v.float().abs().mean()).to(v.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    b, f = folder / f"{stem}_base.safetensors", folder / f"{stem}_ft.safetensors"
    save_file(base, str(b))
    save_file(ft, str(f))
    return str(b), str(f)


def square_pair(folder: Path, n: int, count: int, spectrum: str, seed: int = 1) -> tuple[str, str]:
    """``count`` fp32 n x n matrices: ``decaying`` (σ_i = 1/i, random singular vectors) or ``gaussian``."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(count):
        if spectrum == "decaying":
            q1 = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
            q2 = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
            w = (q1 / torch.arange(1, n + 1)) @ q2.mT
        else:
            w = torch.randn(n, n, generator=g) / n**0.5
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w.contiguous()
    return _save_pair(folder, f"sq{n}_{spectrum}", base, g)


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def cli(*args: str) -> Callable[[], None]:
    """One ``python -m ckptdiff`` process, as a user types it (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run() -> None:
        subprocess.run([sys.executable, "-m", "ckptdiff", *args, "--quiet"], check=True, env=env, capture_output=True)

    return run


def medians(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, call in cases.items():
            times[name].append(timed(call)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="report pair: blocks")
    parser.add_argument("--d", type=int, default=512, help="report pair: hidden size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="spectral per-matrix sizes")
    parser.add_argument("--principal-n", type=int, default=2048, help="principal pair: n x n matrices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["report", "spectral", "principal"])
    args = parser.parse_args()

    import ckptdiff
    from ckptdiff.analyses.full import full_report

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load:.1f}")
    opts: dict[str, Any] = {"progress": False, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "report" not in args.skip:
            b, f = llama_pair(folder, args.layers, args.d)
            out = folder / "report"

            def singles() -> None:
                ckptdiff.sparsity(b, f, **opts)
                ckptdiff.principal_overlap(b, f, **opts)
                ckptdiff.spectral(b, f, **opts)

            def cli_singles() -> None:
                for command in ("sparsity", "principal-overlap", "spectral"):
                    cli(command, b, f)()

            t = medians(
                {
                    "library: three single calls": singles,
                    "library: full_report": lambda: full_report(b, [f], **opts),
                    "CLI: three single commands": cli_singles,
                    "CLI: report": cli("report", b, f, "-o", str(out)),
                },
                args.repeats,
            )
            print(f"\n1. report vs the single commands ({args.layers} blocks, d = {args.d}, defaults), medians:\n")
            print("| run | singles (s) | report (s) | report / singles |")
            print("|---|---|---|---|")
            for how in ("library", "CLI"):
                s_, r_ = t[f"{how}: three single {'calls' if how == 'library' else 'commands'}"], 0.0
                r_ = t[f"{how}: {'full_report' if how == 'library' else 'report'}"]
                print(f"| {how} | {s_:.2f} | {r_:.2f} | {r_ / s_:.2f}x |")
        if "spectral" not in args.skip:
            print("\n2. spectral per matrix (2 square fp32 matrices per pair, k = 64, fp64), medians:\n")
            print("| n | spectrum | exact (s/matrix) | auto (s/matrix) | exact / auto | auto's routes |")
            print("|---|---|---|---|---|---|")
            for n in args.sizes:
                for spectrum in ("decaying", "gaussian"):
                    b, f = square_pair(folder, n, 2, spectrum)
                    routes: list[str] = []

                    def exact(b: str = b, f: str = f) -> None:
                        ckptdiff.spectral(b, f, svd="exact", **opts)

                    def auto(b: str = b, f: str = f, routes: list[str] = routes) -> None:
                        routes.append(ckptdiff.spectral(b, f, svd="auto", **opts).header.get("svd_routes", ""))

                    t = medians({"exact": exact, "auto": auto}, args.repeats)
                    e, a = t["exact"] / 2, t["auto"] / 2
                    print(f"| {n} | {spectrum} | {e:.2f} | {a:.2f} | {e / a:.2f}x | {routes[-1]} |")
        if "principal" not in args.skip:
            n = args.principal_n
            b, f = square_pair(folder, n, 2, "decaying")
            t = medians(
                {
                    "library exact": lambda: ckptdiff.principal_overlap(b, f, svd="exact", **opts),
                    "library randomized": lambda: ckptdiff.principal_overlap(b, f, svd="randomized", **opts),
                    "CLI exact": cli("principal-overlap", b, f, "--svd", "exact"),
                    "CLI randomized": cli("principal-overlap", b, f, "--svd", "randomized"),
                },
                args.repeats,
            )
            print(f"\n3. principal-overlap, 2 fp32 matrices of {n}², k = 64, medians:\n")
            print("| run | exact (s) | randomized (s) | exact / randomized |")
            print("|---|---|---|---|")
            for how in ("library", "CLI"):
                e, r = t[f"{how} exact"], t[f"{how} randomized"]
                print(f"| {how} | {e:.2f} | {r:.2f} | {e / r:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
