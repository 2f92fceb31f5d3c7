"""Benchmark `patch create` against `sparsity` on the same pair, and `patch apply` against the plain way.

A synthetic Llama-like bf16 pair (d = 1024, ff = 2816, as many blocks as the size needs, one safetensors file per
side), a fraction of all entries (default 2%, an RL step) moved by one ULP at random places. In one process,
alternating, each repeated:

- ``ckptdiff.sparsity(base, ft)`` and ``ckptdiff.patch_create(base, ft, out)`` (the same pass plus the patch's bytes
  written and fsynced);
- ``ckptdiff.patch_apply(base, [patch], out)`` (streamed, every tensor's sha256 checked, fsynced) and the plain way:
  ``safetensors.torch.load_file`` of the base and of the patch, a scatter per tensor through integer views,
  ``save_file``, then fsync;
- the disk's write rate: the rebuilt checkpoint's bytes written from memory to a new file, then fsync.

Peak memory (ru_maxrss) of ``patch create`` is measured in a fresh process for the pair and for one twice its size.
Prints Markdown tables of medians.

    python benchmarks/bench_patch.py --mib 256 --repeats 3 --data /tmp/bench-patch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptdiff

D, FF = 1024, 2816


def make_pair(folder: Path, mib: float, changed: float, seed: int = 0) -> tuple[Path, Path]:
    """base.safetensors and ft.safetensors of about ``mib`` MiB each; ``changed`` of the entries moved by one ULP."""
    folder.mkdir(parents=True, exist_ok=True)
    base, ft = folder / f"base-{mib:g}.safetensors", folder / f"ft-{mib:g}-{changed:g}.safetensors"
    if base.exists() and ft.exists():
        return base, ft
    rng = np.random.default_rng(seed)
    per_block = (4 * D * D + 3 * D * FF) * 2
    blocks = max(1, round(mib * 2**20 / per_block))
    b: dict[str, torch.Tensor] = {}
    f: dict[str, torch.Tensor] = {}
    for i in range(blocks):
        p = f"model.layers.{i}"
        shapes = {f"{p}.self_attn.{m}_proj.weight": (D, D) for m in "qkvo"}
        shapes |= {f"{p}.mlp.gate_proj.weight": (FF, D), f"{p}.mlp.up_proj.weight": (FF, D)}
        shapes[f"{p}.mlp.down_proj.weight"] = (D, FF)
        for name, shape in shapes.items():
            w = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).bfloat16()
            moved = torch.from_numpy(rng.random(w.numel()) < changed)
            v = w.clone()
            v.view(-1).view(torch.int16)[moved] += 1
            b[name], f[name] = w, v
    save_file(b, str(base))
    save_file(f, str(ft))
    return base, ft


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_apply(base: Path, patch: Path, out: Path) -> None:
    """The way without ckptdiff: load_file, a scatter per tensor (docs/patches.md), save_file, fsync."""
    w = load_file(str(base))
    with safe_open(str(patch), "pt") as p:
        tensors = json.loads(p.metadata()["ckptdiff.ft"])["tensors"]
    parts = load_file(str(patch))
    result = {}
    for t in tensors:
        n, enc = t["name"], t["encoding"]
        if enc == "dense":
            result[n] = parts[n + ":dense"]
            continue
        x = w[n].clone().reshape(-1)
        if enc == "sparse":
            x.view(torch.int16)[parts[n + ":indices"].long()] = parts[n + ":values"].view(torch.int16)
        elif enc == "bitmask":
            m = (parts[n + ":mask"].reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
            x.view(torch.int16)[m.reshape(-1)[: x.numel()].bool()] = parts[n + ":values"].view(torch.int16)
        result[n] = x.reshape(t["shape"])
    save_file(result, str(out))
    fsync_path(out)


def disk_write(nbytes: int, out: Path) -> None:
    data = np.ones(16 * 2**20, dtype=np.uint8)
    with open(out, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, data.size)
            f.write(data[:n].data)
            left -= n
        f.flush()
        os.fsync(f.fileno())


def peak_rss_mib(base: Path, ft: Path, out: Path) -> float:
    """Peak resident memory (VmHWM) of ``patch create`` in a fresh process (ru_maxrss would carry the parent's)."""
    code = (
        "import sys, ckptdiff\n"
        "ckptdiff.patch_create(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)\n"
        "print(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(base), str(ft), str(out)], capture_output=True, text=True)
    res.check_returncode()
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=256, help="MiB per side (default 256)")
    ap.add_argument("--changed", type=float, default=0.02, help="fraction of entries moved (default 0.02)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("bench-data/patch"))
    args = ap.parse_args()
    base, ft = make_pair(args.data, args.mib, args.changed)
    work = args.data / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    patch = work / "p.safetensors"
    times: dict[str, list[float]] = {k: [] for k in ("sparsity", "create", "apply", "plain", "disk")}
    ckptdiff.sparsity(base, ft, progress=False)  # warm: imports, the kernel, the page cache
    for r in range(args.repeats):
        times["sparsity"].append(timed(lambda: ckptdiff.sparsity(base, ft, progress=False)))
        patch.unlink(missing_ok=True)
        times["create"].append(timed(lambda: ckptdiff.patch_create(base, ft, patch, progress=False)))
        out = work / f"rebuilt-{r}"
        times["apply"].append(timed(partial(ckptdiff.patch_apply, base, [patch], out, progress=False)))
        shutil.rmtree(out)
        plain = work / f"plain-{r}.safetensors"
        times["plain"].append(timed(partial(plain_apply, base, patch, plain)))
        plain.unlink()
        raw = work / f"raw-{r}"
        times["disk"].append(timed(partial(disk_write, ft.stat().st_size, raw)))
        raw.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    side = base.stat().st_size
    psize = patch.stat().st_size
    print(f"pair: {side / 2**20:.0f} MiB per side, {args.changed:.0%} of entries moved; patch {psize / 2**20:.1f} MiB")
    print()
    rows = [
        ("sparsity", "sparsity", "sparsity", 2, "both sides read"),
        ("patch create", "create", "sparsity", 2, ""),
        ("patch apply (ckptdiff)", "apply", "apply", 1, "written"),
        ("load_file + scatter + save_file", "plain", "apply", 1, ""),
        ("disk write of the same bytes", "disk", "apply", 1, ""),
    ]
    print("| run | wall s (median) | ratio | GB/s |")
    print("|---|---|---|---|")
    for label, key, ref, sides, note in rows:
        rate = f"{sides * side / med[key] / 1e9:.2f}" + (f" ({note})" if note else "")
        print(f"| {label} | {med[key]:.2f} | {med[key] / med[ref]:.2f}x | {rate} |")
    print()
    big_base, big_ft = make_pair(args.data, 2 * args.mib, args.changed, seed=1)
    print("| MiB per side | patch create peak RSS MiB |")
    print("|---|---|")
    for b, f in ((base, ft), (big_base, big_ft)):
        out = work / "rss.safetensors"
        out.unlink(missing_ok=True)
        print(f"| {b.stat().st_size / 2**20:.0f} | {peak_rss_mib(b, f, out):.0f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
