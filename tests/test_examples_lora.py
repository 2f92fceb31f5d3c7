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


# Intruder dimensions of the shipped fine-tunes (README "Intruder dimensions: does the LoRA grow directions the
# base does not have?"): every cell of its table and every number of its sentences, from ckptdiff.spectral.

INTRUDER_RUNS = ("lora_sft", "sft", "rl_seed1", "rl_seed2")
NULL_SEEDS = range(5)
SETTINGS = {"defaults": (10, 0.5), "t = 5": (5, 0.5), "t = 20": (20, 0.5), "ε = 0.7": (10, 0.7)}


@pytest.fixture(scope="module")
def intruders() -> dict[tuple[str, str], dict]:
    """Per run and setting: the fine-tune's count, matrices, median cos_min and per module; the null's per seed.

    The RL runs' null is drawn on every seed at the defaults only (the README shows no other RL null)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 28 small SVDs per side: one thread is as fast and does not fight a loaded machine
    out: dict[tuple[str, str], dict] = {}
    try:
        for run in INTRUDER_RUNS:
            for name, (t, eps) in SETTINGS.items():
                seeds = NULL_SEEDS if name == "defaults" or not run.startswith("rl") else [0]
                cell: dict = {"null": [], "null_module": []}
                for seed in seeds:
                    frame = spectral(
                        CKPTS / "base",
                        CKPTS / run,
                        k=16,
                        null="random",
                        seed=seed,
                        intruder_k=t,
                        intruder_eps=eps,
                        include=["*layers*proj.weight"],
                        progress=False,
                    ).to_frame()
                    assert len(frame) == 28 and frame["linear"].all()
                    cell["count"] = int(frame["intruders"].sum())  # the same on every seed: only the null is drawn
                    cell["matrices"] = int((frame["intruders"] > 0).sum())
                    cell["cos_min"] = float(frame["intruder_cos_min"].median())
                    cell["module"] = frame.groupby("module")["intruders"].sum().to_dict()
                    cell["null"].append(int(frame["intruders_null"].sum()))
                    cell["null_module"].append(frame.groupby("module")["intruders_null"].sum().to_dict())
                out[run, name] = cell
    finally:
        torch.set_num_threads(threads)
    return out


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"


def _intruder_section() -> str:
    text = (ROOT / "examples" / "README.md").read_text()
    start = text.index("### Intruder dimensions: does the LoRA grow")
    return text[start : text.index("```", start)]


def test_readme_intruder_table_is_what_spectral_measures(intruders: dict[tuple[str, str], dict]) -> None:
    section = _intruder_section()
    for run in INTRUDER_RUNS:
        row = re.search(rf"^\| {run} \|(.*)\|$", section, re.M)
        assert row is not None, run
        d = intruders[run, "defaults"]
        expected = [str(d["count"]), _span(d["null"]), f"{d['matrices']} of 28", f"{d['cos_min']:.3f}"]
        for name in list(SETTINGS)[1:]:
            c = intruders[run, name]
            expected.append(str(c["count"]) if run.startswith("rl") else f"{c['count']} ({_span(c['null'])})")
        assert [c.strip() for c in row.group(1).split("|")] == expected, run


def test_readme_intruder_claims_hold_on_every_null_seed(intruders: dict[tuple[str, str], dict]) -> None:
    prose = " ".join(_intruder_section().split())
    lora, sft = intruders["lora_sft", "defaults"], intruders["sft", "defaults"]
    # RL grows none at any setting (the table's note and the last sentence of the second bullet)
    assert all(intruders[run, name]["count"] == 0 for run in ("rl_seed1", "rl_seed2") for name in SETTINGS)
    # defaults: more than full SFT and RL, and more than the equal-norm null on every seed
    assert lora["count"] > sft["count"] > 0
    excess = [lora["count"] - n for n in lora["null"]]
    assert all(e > 0 for e in excess), excess
    assert (
        f"it has {lora['count']} intruders in {lora['matrices']} matrices against {sft['count']} for full SFT and "
        f"none for RL" in prose
    )
    beats = f"the LoRA beats its null on 5 of 5 seeds, by {min(excess)} to {max(excess)}."
    assert f"grows {_span(lora['null'])}; {beats}" in prose
    # per module: o_proj holds most, but its null comes close; up_proj's margin over the null's worst seed is largest
    o_null = [m["o"] for m in lora["null_module"]]
    up_null = [m["up"] for m in lora["null_module"]]
    assert max(lora["module"], key=lora["module"].get) == "o"
    o_claim = f"the `o_proj` matrices hold {lora['module']['o']} of the {lora['count']}, where the null puts"
    assert f"{o_claim} {_span(o_null)}" in prose
    margin = {m: lora["module"][m] - max(n[m] for n in lora["null_module"]) for m in lora["module"]}
    assert max(margin, key=margin.get) == "up" and list(margin.values()).count(margin["up"]) == 1, margin
    assert f"the clearest excess is `up_proj` ({lora['module']['up']} against {_span(up_null)})" in prose
    # t = 5: above the null on every seed; t = 20: below it on every seed
    top5, top5_sft = intruders["lora_sft", "t = 5"], intruders["sft", "t = 5"]
    assert all(top5["count"] > n for n in top5["null"])
    assert (
        f"among the top 5 directions it has {top5['count']} intruders where the null has at most "
        f"{max(top5['null'])} (5 of 5 seeds) and SFT {top5_sft['count']}" in prose
    )
    top20 = intruders["lora_sft", "t = 20"]
    assert all(top20["count"] < n for n in top20["null"])
    assert f"({top20['count']} against {_span(top20['null'])}, 5 of 5 seeds)" in prose
    # ε = 0.7: the LoRA's excess widens, and full SFT exceeds its null too, on every seed
    loose, loose_sft = intruders["lora_sft", "ε = 0.7"], intruders["sft", "ε = 0.7"]
    assert min(loose["count"] - n for n in loose["null"]) > max(excess)
    assert all(loose_sft["count"] > n for n in loose_sft["null"])
    assert f"({loose['count']} against {_span(loose['null'])})" in prose
    assert f"({loose_sft['count']} against {_span(loose_sft['null'])})" in prose
