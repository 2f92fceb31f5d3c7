"""Bytes read and time: `report` and `check` in one pass, against the separate commands they replace.

Run as a notebook user would call the library (no environment variables set):

    python benchmarks/bench_one_pass.py --layers 8 --d 512 --repeats 3

Bytes read are the process's ``rchar`` from /proc/self/io around each library call (reads through the page
cache count too, so a warm cache does not hide a second read), divided by the pair's tensor bytes. Times are
medians over the repeats, measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def rchar() -> int:
    """Bytes this process has read so far (read(2)/pread(2), page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def make_pair(folder: Path, layers: int, d: int, seed: int = 0) -> tuple[Path, Path, int]:
    """A Llama-shaped bf16 pair; the fine-tune moves ~20% of every matrix by a small random step."""
    g = torch.Generator().manual_seed(seed)
    ff = int(d * 2.6875)
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(8 * d, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q", "k", "v", "o"):
            base[f"{p}.self_attn.{m}_proj.weight"] = torch.randn(d, d, generator=g) / d**0.5
        base[f"{p}.mlp.gate_proj.weight"] = torch.randn(ff, d, generator=g) / d**0.5
        base[f"{p}.mlp.up_proj.weight"] = torch.randn(ff, d, generator=g) / d**0.5
        base[f"{p}.mlp.down_proj.weight"] = torch.randn(d, ff, generator=g) / ff**0.5
        base[f"{p}.input_layernorm.weight"] = torch.ones(d)
    base = {k: v.bfloat16() for k, v in base.items()}
    ft = {}
    for k, v in base.items():
        step = torch.randn(v.shape, generator=g) * 1e-3 * (torch.rand(v.shape, generator=g) < 0.2)
        ft[k] = (v.float() + step).bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    save_file(ft, str(folder / "ft.safetensors"))
    nbytes = sum(v.numel() * v.element_size() for v in base.values())
    return folder / "base.safetensors", folder / "ft.safetensors", 2 * nbytes


def measure(call: Callable[[], Any]) -> tuple[float, int]:
    """(seconds, bytes read) of one call."""
    before, start = rchar(), time.perf_counter()
    call()
    return time.perf_counter() - start, rchar() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None, help="folder for the pair (default: a temporary one)")
    args = parser.parse_args()

    import ckptdiff
    from ckptdiff import gate as R
    from ckptdiff.analyses.full import full_report
    from ckptdiff.gate.check import Shared

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        base, ft, pair_bytes = make_pair(folder, args.layers, args.d)
        b, f = str(base), str(ft)
        opts: dict[str, Any] = {"progress": False, "device": "cpu"}
        k = args.k
        rules = ("sparsity >= 0.1", "ratio_principal_magnitude <= 2", "nss < 1")
        config = R.CheckConfig(rules=tuple(R.parse_rule(r) for r in rules))

        def separate() -> None:
            ckptdiff.sparsity(b, f, **opts)
            ckptdiff.principal_overlap(b, f, k=k, **opts)
            ckptdiff.spectral(b, f, k=k, **opts)

        cases: dict[str, Callable[[], Any]] = {
            "sparsity + principal-overlap + spectral, separately": separate,
            "report (same three analyses, one pass)": lambda: full_report(b, [f], k=k, **opts),
            "check with a sparsity, a principal and a spectral rule": lambda: ckptdiff.check(
                b, f, config, shared=Shared(device="cpu", progress=False, k=k)
            ),
        }
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, call in cases.items():  # interleaved, so load drifts hit every case alike
                results[name].append(measure(call))
        print(f"pair: {pair_bytes / 1e6:.1f} MB of tensor data ({args.layers} layers, d={args.d}), k={k}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}")
        print()
        print("| run | bytes read / pair bytes | median time (s) |")
        print("|---|---|---|")
        for name, runs in results.items():
            ratio = statistics.median(r for _, r in runs) / pair_bytes
            print(f"| {name} | {ratio:.3f} | {statistics.median(t for t, _ in runs):.2f} |")


if __name__ == "__main__":
    main()
