"""`ckptdiff trajectory` end to end: run inputs (folders, verl layout, globs, Hub revisions), the report directory,
steps.csv against an independent count, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import bump_ulps, llama_like, save_single
from hostile import assert_refused
from typer.testing import CliRunner

from ckptdiff.analyses.trajectory import COLUMNS, STEP_COLUMNS
from ckptdiff.cli import app
from ckptdiff.errors import InputError
from ckptdiff.io.layout import run_checkpoints, step_number

runner = CliRunner()
Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("spec", "step"),
    [
        ("/data/out/checkpoint-500", 500),
        ("/data/out/checkpoint-500/model.safetensors", 500),
        ("/data/global_step_100/actor/huggingface", 100),
        ("./runs/step_000200", 200),
        ("Qwen/Qwen3-4B@step-100", 100),  # the repo name's digits are not the step
        ("Qwen/Qwen3-4B", None),
        ("./runs/run2-step300", None),  # two numbers: no step
    ],
)
def test_step_numbers_come_from_the_nearest_name_with_digits(spec: str, step: int | None) -> None:
    assert step_number(spec) == step


def _verl_run(root: Path, steps: list[int]) -> list[dict[str, torch.Tensor]]:
    """verl's layout: global_step_N/actor/huggingface/model.safetensors, with changes planted per step."""
    sd = llama_like(layers=2, d=16, ff=32, seed=5)
    states = []
    for i, step in enumerate(steps):
        if i:
            sd = dict(sd)
            sd[Q] = bump_ulps(sd[Q], torch.arange(10 * i, 10 * i + 5 * i), 1)  # 5i fresh entries at step i
        states.append(sd)
        save_single(sd, root / f"global_step_{step}" / "actor" / "huggingface" / "model.safetensors")
        (root / f"global_step_{step}" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"fsdp shard")
    (root / "latest_checkpointed_iteration.txt").write_text(str(steps[-1]))
    return states


def test_folders_globs_and_orders(tmp_path: Path) -> None:
    _verl_run(tmp_path / "verl", [20, 100, 3])
    found = run_checkpoints([str(tmp_path / "verl")])
    assert [s for _, s in found] == [3, 20, 100]  # numeric, not text order
    assert all(p.endswith("actor/huggingface") for p, _ in found)
    globbed = run_checkpoints([str(tmp_path / "verl" / "global_step_*")])
    assert globbed == found
    # Inputs given one by one keep their order; a first input without a number (the base) is step 0.
    base = str(tmp_path / "verl" / "global_step_3" / "actor" / "huggingface")
    save_single(llama_like(layers=2, d=16, ff=32, seed=5), tmp_path / "base" / "model.safetensors")
    assert [s for _, s in run_checkpoints([str(tmp_path / "base"), str(tmp_path / "verl")])] == [0, 3, 20, 100]
    # Numbers that do not rise in the order given: positions.
    assert [s for _, s in run_checkpoints([str(tmp_path / "verl"), base])] == [0, 1, 2, 3]
    assert [s for _, s in run_checkpoints(["org/m@step-5", "org/m@step-50"])] == [5, 50]


def test_a_trainer_output_folder_is_its_step_folders_and_links_out_are_refused(tmp_path: Path) -> None:
    sd = llama_like(layers=1, d=8, ff=8)
    out = tmp_path / "out"
    for step in (500, 1000):
        save_single(sd, out / f"checkpoint-{step}" / "model.safetensors")
    save_single(sd, out / "model.safetensors")  # the final model, saved beside the step folders
    assert [(Path(p).name, s) for p, s in run_checkpoints([str(out)])] == [
        ("checkpoint-500", 500),
        ("checkpoint-1000", 1000),
    ]
    save_single(sd, tmp_path / "elsewhere" / "model.safetensors")
    (out / "checkpoint-1500").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        run_checkpoints([str(out)])


def test_ambiguous_run_folders_are_refused(tmp_path: Path) -> None:
    sd = llama_like(layers=1, d=8, ff=8)
    save_single(sd, tmp_path / "run" / "checkpoint-100" / "model.safetensors")
    save_single(sd, tmp_path / "run" / "global_step_100" / "actor" / "huggingface" / "model.safetensors")
    with pytest.raises(InputError, match="two checkpoints of step 100"):
        run_checkpoints([str(tmp_path / "run")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no step-numbered checkpoint"):
        run_checkpoints([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="matches nothing"):
        run_checkpoints([str(tmp_path / "run" / "step_*")])
    with pytest.raises(InputError, match="Hub revisions cannot be matched by a glob"):
        run_checkpoints(["org/model@step-*"])


def test_report_directory_and_steps_csv_hold_the_planted_counts(tmp_path: Path) -> None:
    states = _verl_run(tmp_path / "verl", [10, 20, 30, 40])
    out = tmp_path / "rep"
    steps_csv = tmp_path / "steps.csv"
    args = ["trajectory", str(tmp_path / "verl"), "-o", str(out), "--steps-csv", str(steps_csv), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "step sparsity" in res.output  # the compact per-step table
    names = {p.name for p in out.iterdir()}
    expected = {"index.html", "report.md", "tensors.csv", "steps.csv", "report.json", "figures", ".ckptdiff-report"}
    assert expected <= names
    manifest = json.loads((out / ".ckptdiff-report").read_text())
    assert "steps.csv" in manifest["files"] and "figures/trajectory_layers.svg" in manifest["files"]
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps.columns) == STEP_COLUMNS
    pd.testing.assert_frame_equal(steps, pd.read_csv(steps_csv))
    tensors = pd.read_csv(out / "tensors.csv")
    assert list(tensors.columns) == COLUMNS
    assert sorted(tensors["step"].unique()) == [20, 30, 40]
    overall = steps[steps["scope"] == "overall"].set_index("step")
    numel = sum(t.numel() for t in states[0].values())
    for i, step in enumerate([20, 30, 40], start=1):
        a = states[i - 1][Q].view(torch.int16).numpy()
        b = states[i][Q].view(torch.int16).numpy()
        first = states[0][Q].view(torch.int16).numpy()
        assert overall.loc[step, "changed_step"] == np.count_nonzero(a != b) == 5 * i
        assert overall.loc[step, "changed_cumulative"] == np.count_nonzero(first != b)
        assert overall.loc[step, "sparsity_step"] == pytest.approx(1 - 5 * i / numel, rel=1e-12)
    assert list(steps[steps["step"] == 20]["scope"])[:1] == ["overall"]
    assert "q" in set(steps["scope"])
    html = (out / "index.html").read_text()
    assert "Step-over-step sparsity per layer" in html and "<svg" in html
    # A quoted glob gives the same run; --summary prints the sentences only.
    res = runner.invoke(app, ["trajectory", str(tmp_path / "verl" / "global_step_*"), "-q", "-s"])
    assert res.exit_code == 0, res.output
    assert "Step-over-step update sparsity ranges from" in res.output and "step sparsity" not in res.output


def test_a_step_number_past_64_bits_is_refused(tmp_path: Path) -> None:
    sd = llama_like(layers=1, d=8, ff=8)
    huge = 2**64
    for step in (1, huge):
        save_single(sd, tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors")
    csv = ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json")]
    assert_refused(["trajectory", str(tmp_path / "run"), *csv], tmp_path, [str(huge)], "64 bits")


def test_bad_inputs_are_refused_before_any_work(tmp_path: Path) -> None:
    save_single(llama_like(layers=1, d=8, ff=8), tmp_path / "one" / "model.safetensors")
    one = str(tmp_path / "one")
    csv = ["--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json")]
    assert_refused(["trajectory", one, *csv], tmp_path, [one], "at least 2 checkpoints")
    assert_refused(["trajectory", one, one, "--with", "principal,nss", *csv], tmp_path, ["nss"], "choose from")
    glob = str(tmp_path / "nothing_*")
    assert_refused(["trajectory", glob, *csv], tmp_path, [glob], "matches nothing")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    user = str(tmp_path / "user")
    assert_refused(["trajectory", one, one, "-o", user, *csv], tmp_path, [user], "not a report ckptdiff wrote")
