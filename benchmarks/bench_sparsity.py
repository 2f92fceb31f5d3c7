"""Benchmark `ckptdiff sparsity` against the common approach on a synthetic sharded bf16 pair.

The common approach: load both full state dicts (safetensors.torch.load_file), subtract in torch,
count entries that are not `isclose` to zero. Both run as separate processes, alternating, so the
whole-process wall time and peak anonymous memory (RssAnon, sampled from /proc) are comparable.
In the same run: the in-process comparison throughput of ckptdiff, the page-cache read rate of the
same files, and `ckptdiff --help` start-up time. Reports medians.

    python benchmarks/bench_sparsity.py --sizes-gb 2 4 --repeats 3 --data bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

COMMON = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
def load(d):
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd
base, ft = load(sys.argv[1]), load(sys.argv[2])
changed = total = 0
for k, w0 in base.items():
    d = ft[k] - w0
    changed += int((~torch.isclose(d, torch.zeros_like(d))).sum())
    total += w0.numel()
print(changed, total)
"""


def make_pair(folder: Path, gib: float, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-like bf16 pair of about `gib` GiB per side; half the entries moved by 1 ULP; shards differ."""
    base_dir, ft_dir = folder / f"{gib:g}g" / "base", folder / f"{gib:g}g" / "ft"
    marker = folder / f"{gib:g}g" / "done"
    if marker.exists():
        return base_dir, ft_dir
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    d, ff = 2048, 5632
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    per_layer = sum(a * b for a, b in shapes.values()) * 2
    layers = max(1, round(gib * 2**30 / per_layer))
    block = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32)
    block16 = (block >> 16).astype(np.uint16)  # bf16 bits (truncated fp32: fine for a synthetic base)
    tensors: list[tuple[str, tuple[int, int]]] = []
    for i in range(layers):
        for m, shp in shapes.items():
            part = "self_attn" if m[0] in "qkvo" else "mlp"
            tensors.append((f"model.layers.{i}.{part}.{m}.weight", shp))
    for side, shard_every in (("base", 5), ("ft", 7)):  # different shard boundaries on each side
        out = base_dir if side == "base" else ft_dir
        out.mkdir(parents=True, exist_ok=True)
        shard: dict[str, torch.Tensor] = {}
        idx = {}
        n_shards = (len(tensors) + shard_every - 1) // shard_every
        for j, (name, shp) in enumerate(tensors):
            n = shp[0] * shp[1]
            off = (j * 7919) % (block16.size - n) if n < block16.size else 0
            bits = np.resize(block16[off:], n) if n > block16.size - off else block16[off : off + n].copy()
            if side == "ft":
                bump = np.random.default_rng(seed + j).integers(0, 2, n, dtype=np.uint16)
                bits = bits + bump  # half the entries move by exactly one ULP
            shard[name] = torch.from_numpy(bits.view(np.int16).reshape(shp)).view(torch.bfloat16)
            if len(shard) == shard_every or j == len(tensors) - 1:
                fname = f"model-{len(idx) + 1:05d}-of-{n_shards:05d}.safetensors"
                save_file(shard, str(out / fname))
                idx[fname] = list(shard)
                shard = {}
        weight_map = {t: f for f, ts in idx.items() for t in ts}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    marker.write_text("ok")
    return base_dir, ft_dir


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RssAnon in MiB (sampled every 5 ms), stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
        raise RuntimeError(f"{cmd} failed with {p.returncode}")
    return wall, peak / 1024, out


def page_cache_read_gbs(folders: list[Path]) -> float:
    """Read every file once (already in the page cache) into a reused buffer; GB/s."""
    files = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def in_process_gbs(base: Path, ft: Path) -> tuple[float, float]:
    """ckptdiff's comparison throughput in this process (bytes of both sides / seconds) and the sparsity."""
    from ckptdiff.analyses.sparsity import sparsity

    t0 = time.perf_counter()
    r = sparsity(str(base), str(ft), device="cpu", progress=False)
    dt = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for d in (base, ft) for f in d.glob("*.safetensors"))
    return nbytes / dt / 1e9, r.overall()["sparsity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("bench-data"))
    ap.add_argument("--skip-common-above", type=float, default=8.0, help="skip the common approach above this size")
    args = ap.parse_args()
    py = sys.executable
    help_times = [run_measured([py, "-m", "ckptdiff", "--help"])[0] for _ in range(5)]
    print(f"`ckptdiff --help` whole process: median {statistics.median(help_times):.3f} s over 5 runs\n")
    print("| GiB/side | tool | wall s (median) | peak RssAnon MiB (median) | speed-up | sparsity |")
    print("|---|---|---|---|---|---|")
    extra = []
    for gib in args.sizes_gb:
        base, ft = make_pair(args.data, gib)
        page_cache_read_gbs([base, ft])  # warm the page cache
        walls: dict[str, list[float]] = {"ckptdiff": [], "common": []}
        mems: dict[str, list[float]] = {"ckptdiff": [], "common": []}
        outs: dict[str, str] = {}
        ck_cmd = [py, "-m", "ckptdiff", "sparsity", str(base), str(ft), "--quiet", "--device", "cpu", "-f", "json"]
        common_cmd = [py, "-c", COMMON, str(base), str(ft)]
        for _ in range(args.repeats):
            w, m, out = run_measured(ck_cmd)
            walls["ckptdiff"].append(w)
            mems["ckptdiff"].append(m)
            outs["ckptdiff"] = out
            if gib <= args.skip_common_above:
                w, m, out = run_measured(common_cmd)
                walls["common"].append(w)
                mems["common"].append(m)
                outs["common"] = out
        overall_rows = json.loads(outs["ckptdiff"])["tables"]["Overall (parameter-weighted)"]
        sp_ck = next(r["overall"] for r in overall_rows if r["figure"] == "sparsity")
        med = {k: statistics.median(v) for k, v in walls.items() if v}
        mem = {k: statistics.median(v) for k, v in mems.items() if v}
        speed = med["common"] / med["ckptdiff"] if "common" in med else float("nan")
        print(f"| {gib:g} | ckptdiff | {med['ckptdiff']:.2f} | {mem['ckptdiff']:.0f} | {speed:.1f}x | {sp_ck:.4f} |")
        if "common" in med:
            ch, tot = (int(x) for x in outs["common"].split())
            name = "common (load_file + sub + isclose)"
            print(f"| {gib:g} | {name} | {med['common']:.2f} | {mem['common']:.0f} | 1.0x | {1 - ch / tot:.4f} |")
        thr = []
        rates = []
        for _ in range(args.repeats):
            rates.append(page_cache_read_gbs([base, ft]))
            thr.append(in_process_gbs(base, ft)[0])
        extra.append((gib, statistics.median(thr), statistics.median(rates)))
    print("\n| GiB/side | in-process comparison GB/s (median) | page-cache read GB/s (median) | ratio |")
    print("|---|---|---|---|")
    for gib, t, r in extra:
        print(f"| {gib:g} | {t:.2f} | {r:.2f} | {t / r:.0%} |")
    print(f"\nmachine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
