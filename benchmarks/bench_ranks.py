"""One process against two torchrun ranks, one thread each, on an SVD-bound pair: wall time and identical output.

    python benchmarks/bench_ranks.py --matrices 16 --size 1024 --repeats 2

Each run is a whole process as a user starts it (`python -m ckptdiff ...` with OMP_NUM_THREADS=1, and
`torchrun --standalone --nproc-per-node 2 -m ckptdiff ...`, which sets one thread per rank itself), so torchrun's
start-up is included. Runs are interleaved and the medians compared; the CSVs must be byte-identical.

Start-up is measured too, on a pair of four 64x64 matrices through both launchers: the difference between a
command's time and its launcher's start-up is the work itself, so the work's own speed-up is printed beside the
whole-process one (torchrun's launcher is a third Python process importing torch, a fixed cost per run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def make_pair(folder: Path, matrices: int, size: int) -> tuple[str, str]:
    """Many mid-sized fp32 matrices (shapes alternate so batches differ), each moved by a small random update."""
    g = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for i in range(matrices):
        shape = (size, size) if i % 2 == 0 else (size, size * 2)
        w = torch.randn(shape, generator=g) / size**0.5
        base[f"model.layers.{i}.mlp.w.weight"] = w
        ft[f"model.layers.{i}.mlp.w.weight"] = w + 1e-3 * torch.randn(shape, generator=g) / size**0.5
    save_file(base, str(folder / "base.safetensors"))
    save_file(ft, str(folder / "ft.safetensors"))
    return str(folder / "base.safetensors"), str(folder / "ft.safetensors")


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=48)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    one = [sys.executable, "-m", "ckptdiff"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ckptdiff"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, ft = make_pair(folder, args.matrices, args.size)
        tiny = folder / "tiny"
        tiny.mkdir()
        tiny_base, tiny_ft = make_pair(tiny, 4, 64)
        commands = {
            "spectral": (["spectral", base, ft, "--k", "16", "-q"], "--csv", ".csv"),
            "report": (["report", base, ft, "--k", "16", "-q"], "-o", ""),
        }
        print(f"{args.matrices} fp32 matrices of {args.size}x{args.size} / {args.size}x{2 * args.size}, k=16")
        print("| command | 1 process (s) | 2 ranks (s) | speed-up | output identical |")
        print("|---|---|---|---|---|")
        rows = []
        for name, (cli, flag, suffix) in commands.items():
            times: dict[str, list[float]] = {"one": [], "two": [], "one0": [], "two0": []}
            tiny_cli = [name, tiny_base, tiny_ft, "--k", "16", "-q"]
            for r in range(args.repeats):
                for who, launcher in (("one", one), ("two", two)):
                    out = folder / f"{name}-{who}-{r}{suffix}"
                    times[who].append(timed([*launcher, *cli, flag, str(out)]))
                    times[who + "0"].append(
                        timed([*launcher, *tiny_cli, flag, str(tiny / f"{name}-{who}-{r}{suffix}")])
                    )
            a = folder / f"{name}-one-0{suffix}"
            b = folder / f"{name}-two-0{suffix}"
            if suffix:
                same = a.read_bytes() == b.read_bytes()
            else:
                same = (a / "tensors.csv").read_bytes() == (b / "tensors.csv").read_bytes()
            t1, t2 = statistics.median(times["one"]), statistics.median(times["two"])
            s1, s2 = statistics.median(times["one0"]), statistics.median(times["two0"])
            print(f"| {name} | {t1:.2f} | {t2:.2f} | {t1 / t2:.2f}x | {'yes' if same else 'NO'} |")
            rows.append(
                f"| {name} | {s1:.2f} | {s2:.2f} | {t1 - s1:.2f} | {t2 - s2:.2f} | {(t1 - s1) / (t2 - s2):.2f}x |"
            )
        print()
        print("Start-up (the same command on four 64x64 matrices) and the work without it:")
        print(
            "| command | start-up, 1 process (s) | start-up, 2 ranks (s) | work, 1 process (s) | work, 2 ranks (s) "
            "| work speed-up |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
