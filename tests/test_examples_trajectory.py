"""examples/README.md's "A run over time": the shipped intermediate checkpoints of rl_seed1 and what the README says
`ckptdiff trajectory` finds on them, recomputed from the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import ckptdiff
from examples.tinylm import ckpt_io

ROOT = Path(__file__).resolve().parent.parent
CKPTS = ROOT / "examples" / "checkpoints"
STEPS = CKPTS / "rl_seed1" / "steps"
README = ROOT / "examples" / "README.md"


@pytest.fixture(scope="module")
def steps() -> pd.DataFrame:
    frame = ckptdiff.trajectory(STEPS, progress=False).steps_frame()
    return frame[frame["scope"] == "overall"].set_index("step")


def test_the_steps_folder_starts_at_the_base_and_is_found_in_step_order(steps: pd.DataFrame) -> None:
    runs = {r["name"]: r for r in json.loads((CKPTS / "runs.json").read_text())}
    assert ckpt_io.sha256(STEPS / "step_000" / ckpt_io.WEIGHTS) == runs["base"]["sha256"]
    assert list(steps.index) == [1, 100, 101, 199, 200]


def test_the_readme_table_is_what_trajectory_measures(steps: pd.DataFrame) -> None:
    text = README.read_text()
    numel = int(steps["numel"].iloc[0])
    for step, row in steps.iterrows():
        changed = int(row["changed_step"])
        cells = [
            f"{changed:,}",
            f"{changed / numel:.2%}",
            f"{row['sparsity_step']:.4f}",
            f"{row['sparsity_cumulative']:.4f}",
            f"{int(row['patch_bytes']):,}",
        ]
        pattern = rf"\| {step} \| step \d+[^|]* \| " + r" \| ".join(re.escape(c) for c in cells) + r" \|"
        assert re.search(pattern, text), f"examples/README.md: the row of step {step} should read {cells}"


def test_the_prose_claims_hold(steps: pd.DataFrame) -> None:
    numel = steps["numel"].iloc[0]
    single = steps.loc[[1, 101, 200], "changed_step"] / numel  # one optimizer step each
    assert single.between(0.035, 0.047 + 5e-4).all()  # "3.5-4.7% of this model's bf16 entries"
    assert single.is_monotonic_decreasing  # "slowly falling over the run"
    ulp1 = steps.loc[[1, 101, 200], "ulp_1"] / steps.loc[[1, 101, 200], "changed_step"]
    assert round(ulp1.loc[1], 2) == 0.50 and (ulp1.loc[[101, 200]].round(2) == 0.87).all()
    shipped = ckptdiff.sparsity(CKPTS / "base", CKPTS / "rl_seed1", progress=False).overall()["sparsity"]
    assert round(steps.loc[200, "sparsity_cumulative"], 3) == round(shipped, 3) == 0.169
