"""Tensor-name parsing on DeepSeek-V3's 95,855 names: ckptdiff.naming against an earlier revision of itself.

The baseline is naming.py as it was at ``--baseline-rev`` (read with ``git show``), loaded beside the current
module in the same process; both run on the same names, alternating, ``--repeats`` times each, and the medians
are printed. The current ``module_of`` is timed without its cache (``__wrapped__``): the first pass of a run is
what costs. ``stacks`` (new: every name's stack, read once per run by alignment) is timed on its own.

    python benchmarks/bench_naming.py --baseline-rev 4de2ad9 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def deepseek_v3_names() -> list[str]:
    """The tensor names of deepseek-ai/DeepSeek-V3's index: 61 decoder layers + the MTP layer, 256 experts each
    (FP8 weights with their weight_scale_inv). Layers 0-2 are dense there; here every layer has experts."""
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for layer in range(62):
        p = f"model.layers.{layer}"
        attn = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_layernorm", "kv_a_layernorm")
        names += [f"{p}.self_attn.{m}.weight" for m in attn]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight", f"{p}.mlp.gate.weight"]
        for e in range(256):
            names += [f"{p}.mlp.experts.{e}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            names += [f"{p}.mlp.experts.{e}.{m}.weight_scale_inv" for m in ("gate_proj", "up_proj", "down_proj")]
    names += [f"model.layers.61.{m}.weight" for m in ("eh_proj", "enorm", "hnorm", "embed_tokens")]
    return names


def timed(fn: Callable[[str], object], names: list[str]) -> float:
    start = time.perf_counter()
    for n in names:
        fn(n)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default="4de2ad9")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    old_src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{args.baseline_rev}:ckptdiff/naming.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "naming_baseline.py"
        old_path.write_text(old_src, encoding="utf-8")
        old = load(old_path, "naming_baseline")
    new = load(ROOT / "ckptdiff" / "naming.py", "naming_current")
    names = deepseek_v3_names()
    runs: dict[str, list[float]] = {"baseline module_of": [], "current module_of (uncached)": [], "current stacks": []}
    for _ in range(args.repeats):
        runs["baseline module_of"].append(timed(old.module_of, names))
        runs["current module_of (uncached)"].append(timed(new.module_of.__wrapped__, names))
        start = time.perf_counter()
        new.stacks(names)
        runs["current stacks"].append(time.perf_counter() - start)
    base = statistics.median(runs["baseline module_of"])
    print(f"{len(names):,} names, {args.repeats} runs each, medians")
    print("| what | s (median) | vs baseline module_of |")
    print("|---|---|---|")
    for what, ts in runs.items():
        med = statistics.median(ts)
        print(f"| {what} | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
