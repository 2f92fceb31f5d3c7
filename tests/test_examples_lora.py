"""The LoRA example: the adapter code's known-by-construction behaviour on a tiny run, and the figures
examples/README.md states for the shipped adapter (section "A LoRA fine-tune")."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not part of the installed ckptdiff package
    sys.path.insert(0, str(ROOT))

from ckptdiff.analyses.sparsity import sparsity  # noqa: E402
from ckptdiff.analyses.spectral import spectral  # noqa: E402
from ckptdiff.io import resolve  # noqa: E402
from examples.tinylm import lora, train  # noqa: E402

CKPTS = ROOT / "examples" / "checkpoints"
TINY_PRE = train.PretrainConfig(
    digits=2, d_model=16, n_layers=2, n_heads=2, d_mlp=32, steps=2, batch=16, warmup=1, eval_every=1, eval_problems=64
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lora") / "base"
    train.pretrain(TINY_PRE, out)
    return out


def test_untrained_adapter_is_the_base_and_training_moves_only_the_targets(tiny_base: Path, tmp_path: Path) -> None:
    """B starts at zero, so a 0-step adapter merges to the base exactly; one step moves the 14 target matrices."""
    zero = tmp_path / "zero"
    lora.lora_sft(tiny_base, lora.LoRAConfig(r=2, alpha=4, steps=0, batch=8, eval_every=1), zero)
    config = json.loads((zero / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    factors = load_file(str(zero / lora.ADAPTER_WEIGHTS))
    assert len(factors) == 2 * 7 * 2  # A and B for 7 linears in each of 2 layers
    assert factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 16)
    assert factors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 2)
    assert sparsity(tiny_base, zero, progress=False).overall()["changed"] == 0
    one = tmp_path / "one"
    lora.lora_sft(tiny_base, lora.LoRAConfig(r=2, alpha=4, steps=1, batch=8, eval_every=1), one)
    frame = sparsity(tiny_base, one, merged_dtype="fp32", progress=False).to_frame()
    moved = set(frame.loc[frame["changed"] > 0, "tensor"])
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in _targets()}


def _targets() -> list[str]:
    return [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def readme_row(run: str) -> list[str]:
    text = (ROOT / "examples" / "README.md").read_text()
    section = text[text.index("## A LoRA fine-tune") :]
    row = re.search(rf"^\| {run} \|(.*)\|$", section, re.M)
    assert row is not None, run
    return [c.strip() for c in row.group(1).split("|")]


@pytest.mark.parametrize("run", ["lora_sft", "sft", "rl_seed1"])
def test_readme_figures_beside_the_full_fine_tunes(run: str) -> None:
    base, ft = CKPTS / "base", CKPTS / run
    frame = spectral(base, ft, k=16, null="random", include=["*layers*proj.weight"], progress=False).to_frame()
    assert len(frame) == 28
    rel, nss, nss_null, angle, angle_null, unchanged = readme_row(run)
    assert f"{frame['delta_rel_fro'].median():.3g}" == rel
    assert f"{frame['nss'].median():.3g}" == nss
    assert f"{frame['nss_null_ratio'].median():.2f}" == nss_null
    assert f"{frame['angle_u_max_deg'].median():.1f}°" == angle
    assert f"{frame['angle_u_max_null_ratio'].median():.2f}" == angle_null
    assert f"{sparsity(base, ft, progress=False).overall()['sparsity']:.1%}" == unchanged


def test_bf16_rounding_breaks_the_low_rank() -> None:
    """W + 2BA has rank-8 ΔW; merged in fp32 the energy beyond σ₈ is rounding (~1e-14), in bf16 ~3e-5."""
    base = resolve.open(CKPTS / "base")
    beyond: dict[str, list[float]] = {"fp32": [], "bf16": []}
    try:
        for key, dtype in (("fp32", torch.float32), ("bf16", None)):
            merged = resolve.open(CKPTS / "lora_sft", base=base, merged_dtype=dtype)
            for name in merged.infos:
                if ".layers." in name and name.endswith("proj.weight"):
                    delta = merged.read_full(name).double() - base.read_full(name).double()
                    s = torch.linalg.svdvals(delta)
                    beyond[key].append(float((s[8:] ** 2).sum() / (s**2).sum()))
    finally:
        base.close()
    assert len(beyond["fp32"]) == len(beyond["bf16"]) == 28
    assert max(beyond["fp32"]) < 1e-12
    assert 1e-5 < statistics.median(beyond["bf16"]) < 1e-4
