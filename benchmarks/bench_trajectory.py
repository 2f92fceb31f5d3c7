"""`ckptdiff trajectory` over N checkpoints against the pairwise `sparsity` runs it replaces (issue 21).

    python benchmarks/bench_trajectory.py --mib 64 --counts 3 12 --repeats 3

A run of N checkpoints (each one bf16 tensor per layer, ``--mib`` MiB per checkpoint, about 2% of entries moved by
1 ULP per step) is measured two ways, each in its own process, alternating, ``--repeats`` times:

- trajectory: one ``ckptdiff.trajectory(run)`` call (every checkpoint read once);
- pairwise: the 2(N-1) ``ckptdiff.sparsity`` calls that give the same step-over-step and cumulative counts.

Reported: wall seconds (median), peak anonymous memory (RssAnon sampled every 5 ms; file-backed pages excluded),
and the bytes each process read during the calls (``rchar`` of /proc/self/io, page cache included; imports and
the compiled kernel loaded before counting) over the run's bytes.
The machine is shared and noisy: compare figures within one table only.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = """
import sys, ckptdiff
from pathlib import Path
import ckptdiff.analyses.sparsity, ckptdiff.analyses.trajectory  # imports read files too: done before counting
from ckptdiff.metrics.sparsity import _compiled_kernels
_compiled_kernels()
def rchar():
    return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])
start = rchar()
run = sorted((p for p in Path(sys.argv[2]).iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
if sys.argv[1] == "trajectory":
    ckptdiff.trajectory([str(p) for p in run], progress=False)
else:
    for k in range(1, len(run)):
        ckptdiff.sparsity(str(run[k - 1]), str(run[k]), progress=False)
        ckptdiff.sparsity(str(run[0]), str(run[k]), progress=False)
print(rchar() - start)
"""


def make_run(folder: Path, n: int, mib: int, seed: int = 0) -> Path:
    """checkpoint-0 ... checkpoint-(n-1): 8 bf16 matrices of mib/8 MiB each, ~2% of entries 1 ULP up per step."""
    run = folder / f"run{n}"
    if (run / "done").exists():
        return run
    g = torch.Generator().manual_seed(seed)
    rows = mib * 1024 * 1024 // 2 // 8 // 1024
    sd = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, 1024, generator=g).bfloat16() for i in range(8)}
    for step in range(n):
        if step:
            for name, t in sd.items():
                flat = t.reshape(-1).view(torch.int16).clone()
                idx = torch.randint(0, flat.numel(), (flat.numel() // 50,), generator=g)
                flat[idx] += 1
                sd[name] = flat.view(torch.bfloat16).reshape(t.shape)
        out = run / f"checkpoint-{step}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / "model.safetensors"))
    (run / "done").write_text("ok")
    return run


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(how: str, run: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RssAnon MiB, bytes read of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, how, str(run)], stdout=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kb(p.pid))
            time.sleep(0.005)

    th = threading.Thread(target=watch)
    th.start()
    out, _ = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{how} failed with {p.returncode}")
    return wall, peak / 1024, int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64, help="MiB per checkpoint")
    ap.add_argument("--counts", type=int, nargs="+", default=[3, 12])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    folder = args.data or Path(tempfile.mkdtemp(prefix="bench-trajectory-"))
    print("| checkpoints | tool | wall s (median) | peak RssAnon MiB (median) | bytes read / run bytes | speed-up |")
    print("|---|---|---|---|---|---|")
    for n in args.counts:
        run = make_run(folder, n, args.mib)
        total = sum(p.stat().st_size for p in run.rglob("*.safetensors"))
        got: dict[str, list[tuple[float, float, int]]] = {"trajectory": [], "pairwise": []}
        for _ in range(args.repeats):
            for how in got:
                got[how].append(measured(how, run))
        base = statistics.median(w for w, _, _ in got["pairwise"])
        for how, runs in got.items():
            wall = statistics.median(w for w, _, _ in runs)
            rss = statistics.median(r for _, r, _ in runs)
            read = statistics.median(b for _, _, b in runs) / total
            print(f"| {n} | {how} | {wall:.2f} | {rss:.0f} | {read:.2f} | {base / wall:.1f}x |")


if __name__ == "__main__":
    main()
