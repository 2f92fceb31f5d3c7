"""Quick check: fraction of bf16 entries bit-identical to the base, per fine-tuned checkpoint.

    python -m examples.tinylm.bf16_unchanged examples/checkpoints

This is a sanity check for the example, not ckptdiff's metric code (see ckptdiff for that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from examples.tinylm.ckpt_io import RUN_ORDER, WEIGHTS


def unchanged_counts(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> dict[str, int]:
    """Counts of bit-identical entries (+0 == -0) overall and in 2-D matrices inside blocks."""
    out = {"same": 0, "n": 0, "lin_same": 0, "lin_n": 0}
    for name, w0 in base.items():
        w1 = ft[name]
        same = (w0.view(torch.int16) == w1.view(torch.int16)) | ((w0 == 0) & (w1 == 0))
        out["same"] += int(same.sum())
        out["n"] += w0.numel()
        if name.startswith("model.layers.") and w0.dim() == 2:
            out["lin_same"] += int(same.sum())
            out["lin_n"] += w0.numel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    root = parser.parse_args().root
    base = load_file(str(root / "base" / WEIGHTS))
    print("run,unchanged_all,unchanged_linear")
    for name in RUN_ORDER[1:]:
        path = root / name / WEIGHTS
        if path.is_file():
            c = unchanged_counts(base, load_file(str(path)))
            print(f"{name},{c['same'] / c['n']:.4f},{c['lin_same'] / c['lin_n']:.4f}")


if __name__ == "__main__":
    main()
