"""How fast bad input fails, against `ckptdiff --help` (issue 23 item 9, issue 26 item 3).

Runs, as separate processes, alternating, ``--repeats`` times each, the worktree's CLI (``python -m ckptdiff``):

- ``--help``: the baseline, nothing but the command table and typer;
- a mistyped checkpoint path (``sparsity BASE rl_sed1``), refused with "did you mean";
- an unwritable destination (``spectral BASE FT --json /proc/ckptdiff-x.json``);
- a run that reaches the analyses (``sparsity BASE FT --summary``) on the shipped checkpoints, for scale: it loads
  torch, pandas and numba.

Prints one Markdown table of medians and each one's ratio to ``--help``. ``--baseline-root DIR`` (another
checkout, e.g. ``git archive <commit> ckptdiff | tar -x -C DIR``) runs the same cases with that tree's code too,
interleaved, as the "before" rows. The machine is shared and noisy: compare the rows of one run only.

    python benchmarks/bench_startup.py --repeats 7 [--baseline-root /tmp/before]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "checkpoints" / "base"
FT = ROOT / "examples" / "checkpoints" / "rl_seed1"

CASES = {
    "--help": ["--help"],
    "mistyped path": ["sparsity", str(BASE), str(FT.parent / "rl_sed1")],
    "unwritable --json": ["spectral", str(BASE), str(FT), "--json", "/proc/ckptdiff-x.json"],
    "sparsity (a real run)": ["sparsity", str(BASE), str(FT), "--summary", "-q"],
}


def _once(args: list[str], root: Path = ROOT) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    run = [sys.executable, "-m", "ckptdiff", *args]  # cwd=root: `-m` puts the working directory first on the path
    done = subprocess.run(run, capture_output=True, env=env, cwd=root, check=False)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline-root", type=Path, default=None, help="another tree's code, run side by side")
    args = parser.parse_args()
    roots = {"": ROOT} | ({" (before)": args.baseline_root} if args.baseline_root else {})
    rows = [(name + tag, argv, root) for name, argv in CASES.items() for tag, root in roots.items()]
    times: dict[str, list[float]] = {row[0]: [] for row in rows}
    codes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, argv, root in rows:  # alternating: a burst of load on the machine hits every case alike
            seconds, code = _once(argv, root)
            times[name].append(seconds)
            codes[name] = code
    help_median = statistics.median(times["--help"])
    print(f"| case | exit code | wall s (median of {args.repeats}) | ratio to --help |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {codes[name]} | {median:.2f} | {median / help_median:.2f}x |")


if __name__ == "__main__":
    main()
