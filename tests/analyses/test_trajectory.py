"""`trajectory`: a synthetic run of 6 checkpoints with planted per-step changes, checked exactly; one read of each
checkpoint; the same counts as pairwise `sparsity` runs; the same results when two ranks split the tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factory import CountingSource, as_two_ranks, bump_ulps, llama_like, save_single
from hub_server import serve

from ckptdiff.analyses.principal import principal_overlap
from ckptdiff.analyses.sparsity import sparsity
from ckptdiff.analyses.spectral import spectral
from ckptdiff.analyses.trajectory import TrajectoryAnalysis, trajectory
from ckptdiff.engine.alignment import align
from ckptdiff.engine.pipeline import Run
from ckptdiff.errors import InputError
from ckptdiff.io.resolve import open_stored
from ckptdiff.render.figures import trajectory_figures

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
SCALE = "model.extra.scale"  # fp32, 1-D: has a bf16 view
STEPS = [5, 10, 50, 100, 200, 1000]  # names sort differently as text (checkpoint-1000 < checkpoint-200)
# Per step (index k of the run, k >= 1): (tensor, flat indices, ULPs moved from checkpoint k-1).
PLAN: dict[int, list[tuple[str, range, int]]] = {
    1: [(Q0, range(0, 8), 1)],
    2: [(UP1, range(0, 20), 2), (SCALE, range(0, 3), 1)],
    3: [(Q0, range(0, 8), -1)],  # step 1 undone: q is back to the first checkpoint's bits
    4: [(Q0, range(4, 12), 3)],
    5: [],  # nothing moved
}
# Known by construction: entries changed step over step and since the first checkpoint, per step and tensor.
STEP_CHANGED = {1: {Q0: 8}, 2: {UP1: 20, SCALE: 3}, 3: {Q0: 8}, 4: {Q0: 8}, 5: {}}
CUM_CHANGED = {
    1: {Q0: 8},
    2: {Q0: 8, UP1: 20, SCALE: 3},
    3: {UP1: 20, SCALE: 3},
    4: {Q0: 8, UP1: 20, SCALE: 3},
    5: {Q0: 8, UP1: 20, SCALE: 3},
}


def _run_states() -> list[dict[str, torch.Tensor]]:
    sd = llama_like(layers=2, d=16, ff=32, seed=3)
    sd[SCALE] = torch.linspace(0.5, 1.5, 16)
    states = [sd]
    for k in range(1, len(STEPS)):
        nxt = {n: t.clone() for n, t in states[-1].items()}
        for name, idx, ulps in PLAN[k]:
            nxt[name] = bump_ulps(nxt[name], torch.tensor(list(idx)), ulps)
        states.append(nxt)
    return states


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """A Trainer-style output folder: checkpoint-N/model.safetensors (+ optimizer.pt, which is not the model)."""
    root = tmp_path_factory.mktemp("run")
    states = _run_states()
    for step, sd in zip(STEPS, states, strict=True):
        save_single(sd, root / f"checkpoint-{step}" / "model.safetensors")
        (root / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"not a model")
    (root / "runs").mkdir()  # TensorBoard logs beside the checkpoints: no step number, not a checkpoint
    return root, states


def _patch_bytes(numel: int, changed: int, itemsize: int) -> int:
    """The cheapest exact patch, written out here: int32 indices + values, a bitmask + values, or the whole tensor."""
    if changed == 0:
        return 0
    return min(changed * (4 + itemsize), -(-numel // 8) + changed * itemsize, numel * itemsize)


def _bf16_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    x = a.to(torch.bfloat16).view(torch.int16).numpy()
    y = b.to(torch.bfloat16).view(torch.int16).numpy()
    return int(np.count_nonzero(x != y))


def test_a_planted_run_is_counted_exactly_step_by_step_and_cumulatively(
    run_dir: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    root, states = run_dir
    result = trajectory(root, progress=False)  # one folder of step folders, as a Path
    assert result.steps == tuple(STEPS)  # sorted numerically, from the folder names
    assert [Path(c).name for c in result.checkpoints] == [f"checkpoint-{s}" for s in STEPS]
    df = result.to_frame()
    assert len(df) == (len(STEPS) - 1) * len(states[0])  # one row per tensor and step after the first
    for k in range(1, len(STEPS)):
        at = df[df["step"] == STEPS[k]].set_index("tensor")
        for name, t in states[0].items():
            row = at.loc[name]
            assert int(row["changed_step"]) == STEP_CHANGED[k].get(name, 0), (k, name)
            assert int(row["changed_cumulative"]) == CUM_CHANGED[k].get(name, 0), (k, name)
            n = t.numel()
            assert row["sparsity_step"] == pytest.approx(1 - STEP_CHANGED[k].get(name, 0) / n, abs=0)
            assert int(row["patch_bytes"]) == _patch_bytes(n, STEP_CHANGED[k].get(name, 0), t.element_size())
        # ULP buckets of the step-over-step changes: moved by 1, 2 or 3 ULPs as planted.
        buckets = {1: "ulp_1", 2: "ulp_2", 3: "ulp_3_4", -1: "ulp_1"}
        for name, idx, ulps in PLAN[k]:
            assert int(at.loc[name, buckets[ulps]]) == len(idx)
        # bf16 view of the fp32 tensor, against a plain rounding and compare.
        assert int(at.loc[SCALE, "changed_step_bf16"]) == _bf16_changed(states[k - 1][SCALE], states[k][SCALE])
        assert int(at.loc[SCALE, "changed_cumulative_bf16"]) == _bf16_changed(states[0][SCALE], states[k][SCALE])
        assert pd.isna(at.loc[Q0, "changed_step_bf16"])  # bf16 as stored: no second view

    steps = result.steps_frame()
    overall = steps[steps["scope"] == "overall"].set_index("step")
    numel = sum(t.numel() for t in states[0].values())
    for k in range(1, len(STEPS)):
        o = overall.loc[STEPS[k]]
        assert int(o["numel"]) == numel
        assert int(o["changed_step"]) == sum(STEP_CHANGED[k].values())
        assert int(o["changed_cumulative"]) == sum(CUM_CHANGED[k].values())
        assert o["sparsity_step"] == pytest.approx(1 - sum(STEP_CHANGED[k].values()) / numel, rel=1e-12)
        assert o["sparsity_cumulative"] == pytest.approx(1 - sum(CUM_CHANGED[k].values()) / numel, rel=1e-12)
        planted = {name: (t.numel(), STEP_CHANGED[k].get(name, 0), t.element_size()) for name, t in states[0].items()}
        assert int(o["patch_bytes"]) == sum(_patch_bytes(*v) for v in planted.values())
    # Module-type rows follow the overall row of each step: q at step 4 holds the 8 changes of that step.
    q4 = steps[(steps["step"] == STEPS[4]) & (steps["scope"] == "q")].iloc[0]
    q_numel = sum(t.numel() for n, t in states[0].items() if n.endswith("q_proj.weight"))
    assert int(q4["changed_step"]) == 8
    assert q4["sparsity_step"] == pytest.approx(1 - 8 / q_numel, rel=1e-12)
    assert steps[steps["step"] == STEPS[1]]["scope"].iloc[0] == "overall"


def test_each_checkpoint_is_read_once_and_counts_equal_pairwise_sparsity(
    run_dir: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    root, _ = run_dir
    paths = [str(root / f"checkpoint-{s}") for s in STEPS]
    srcs = [CountingSource(open_stored(p)) for p in paths]
    result = trajectory(srcs, steps=STEPS, progress=False)
    for src in srcs:  # every byte of every checkpoint, read exactly once
        for name, info in src.infos.items():
            assert src.bytes[name] == info.nbytes, (src.spec, name)
    df = result.to_frame()
    cols = ["changed", "sparsity", "changed_bf16", "sparsity_bf16", "ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16"]
    for k in range(1, len(STEPS)):
        at = df[df["step"] == STEPS[k]].set_index("tensor")
        pair = sparsity(paths[k - 1], paths[k], progress=False).to_frame().set_index("tensor")
        cum = sparsity(paths[0], paths[k], progress=False).to_frame().set_index("tensor")
        mine_step = at[["changed_step", "sparsity_step", "changed_step_bf16", "sparsity_step_bf16", *cols[4:]]]
        mine_cum = at[["changed_cumulative", "sparsity_cumulative", "changed_cumulative_bf16"]]
        pd.testing.assert_frame_equal(mine_step.set_axis(cols, axis=1), pair[cols], check_dtype=False)
        pd.testing.assert_frame_equal(mine_cum.set_axis(cols[:3], axis=1), cum[cols[:3]], check_dtype=False)


@pytest.mark.parametrize("steps", [[5, 10, 10, 100], [5, 10, 5, 100]])
def test_step_numbers_given_twice_are_refused(
    run_dir: tuple[Path, list[dict[str, torch.Tensor]]], steps: list[int]
) -> None:
    """Rows and figures are keyed by step: a repeated step would add two steps' counts into one row."""
    root, _ = run_dir
    paths = [str(root / f"checkpoint-{s}") for s in STEPS[:4]]
    with pytest.raises(InputError, match=r"step 10 .*twice|step 5 .*twice"):
        trajectory(paths, steps=steps, progress=False)


def test_two_ranks_give_the_one_process_result(run_dir: tuple[Path, list[dict[str, torch.Tensor]]]) -> None:
    root, _ = run_dir
    srcs = [open_stored(str(root / f"checkpoint-{s}")) for s in STEPS]
    labels = tuple(f"step {s}" for s in STEPS)
    run = Run(tuple(srcs), labels, tuple(align(srcs, labels=labels)), torch.device("cpu"), 2 * 1024**3)
    from ckptdiff.engine.pipeline import execute

    (whole,) = execute(run, [TrajectoryAnalysis(STEPS)], progress=False)
    (split,) = as_two_ranks(run, lambda: [TrajectoryAnalysis(STEPS)])
    pd.testing.assert_frame_equal(whole.to_frame(), split.to_frame())
    assert int(whole.overall()["changed_step"].sum()) == sum(sum(v.values()) for v in STEP_CHANGED.values())


def test_hub_revisions_are_a_run_read_once_each(
    run_dir: tuple[Path, list[dict[str, torch.Tensor]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """org/name@step-N revisions of one Hub repo (the fake Hub, streamed by byte range) give the local result."""
    root, _ = run_dir
    local = trajectory([str(root / f"checkpoint-{s}") for s in STEPS[:3]], progress=False)
    with serve(tmp_path, monkeypatch) as hub:
        monkeypatch.setenv("CKPTDIFF_HUB_STREAM", "1")
        hub.add("acme/run", root / f"checkpoint-{STEPS[0]}", "0" * 40, branches=(f"step-{STEPS[0]}",))
        for i, step in enumerate(STEPS[1:3], start=1):
            hub.add_revision("acme/run", root / f"checkpoint-{step}", str(i) * 40, (f"step-{step}",))
        streamed = trajectory([f"acme/run@step-{s}" for s in STEPS[:3]], progress=False)
        weights = sum((root / f"checkpoint-{s}" / "model.safetensors").stat().st_size for s in STEPS[:3])
        assert hub.bytes_served(".safetensors") == weights  # each revision's bytes crossed once
    assert streamed.steps == tuple(STEPS[:3])
    cols = ["step", "tensor", "changed_step", "changed_cumulative", "patch_bytes", "ulp_1", "ulp_2"]
    pd.testing.assert_frame_equal(streamed.to_frame()[cols], local.to_frame()[cols])


def test_with_principal_and_spectral_gives_the_single_commands_first_to_k(
    run_dir: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    root, _ = run_dir
    paths = [str(root / f"checkpoint-{s}") for s in STEPS[:4]]
    srcs = [CountingSource(open_stored(p)) for p in paths]
    result = trajectory(srcs, steps=STEPS[:4], with_=["principal", "spectral"], k=4, svd="exact", progress=False)
    for src in srcs:  # matrices now read whole, for every analysis of the pass at once: still once
        assert all(src.bytes[name] == info.nbytes for name, info in src.infos.items()), src.spec
    steps = result.steps_frame()
    for k in range(1, 4):
        p = principal_overlap(paths[0], paths[k], k=4, svd="exact", progress=False)
        s = spectral(paths[0], paths[k], k=4, progress=False)
        o = steps[(steps["step"] == STEPS[k]) & (steps["scope"] == "overall")].iloc[0]
        assert o["ratio_principal"] == p.overall()["ratio_principal"]
        assert o["ratio_principal_magnitude"] == p.overall()["ratio_principal_magnitude"]
        assert o["nss_median"] == s.overall()["nss_median"] and o["nss_max"] == s.overall()["nss_max"]
        assert o["nss_per_update"] == s.overall()["nss_per_update"]
        q = steps[(steps["step"] == STEPS[k]) & (steps["scope"] == "q")].iloc[0]
        assert q["nss_max"] == s.by("module").loc["q", "nss_max"]
    # Step 3 undid step 1 on q: from the first checkpoint, q's spectrum is back where it was (NSS 0).
    q3 = steps[(steps["step"] == STEPS[3]) & (steps["scope"] == "q")].iloc[0]
    assert q3["nss_max"] == 0.0


def test_a_vision_and_a_text_stack_are_separate_scopes(tmp_path: Path) -> None:
    """A multimodal run: the vision tower's q and the text decoder's q are two rows of steps.csv and of the rollups,
    as in every pairwise command; the changed counts are planted, so each row is known by construction."""
    vision = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    text = "language_model.model.layers.0.self_attn.q_proj.weight"
    norm = "language_model.model.layers.0.input_layernorm.weight"
    g = torch.Generator().manual_seed(0)
    first = {vision: torch.randn(8, 8, generator=g), text: torch.randn(8, 8, generator=g), norm: torch.ones(8)}
    plan = {1: {vision: 5, text: 2}, 2: {text: 7}}  # step index -> tensor -> entries moved (by 1 ULP, from entry 0)
    states = [first]
    for k in (1, 2):
        nxt = {n: t.clone() for n, t in states[-1].items()}
        for name, n in plan[k].items():
            nxt[name] = bump_ulps(nxt[name], torch.arange(n), 1)
        states.append(nxt)
    paths = [
        save_single(sd, tmp_path / f"step_{s}" / "model.safetensors") for s, sd in zip((0, 1, 2), states, strict=True)
    ]
    result = trajectory([p.parent for p in paths], with_=("principal",), k=2, progress=False)
    steps = result.steps_frame()
    scoped = steps[steps["scope"] != "overall"].set_index(["step", "stack", "scope"])
    assert set(scoped.index) == {
        (s, st, m) for s in (1, 2) for st, m in (("vision", "q"), ("decoder", "q"), ("decoder", "norm"))
    }
    assert int(scoped.loc[(1, "vision", "q"), "changed_step"]) == 5
    assert int(scoped.loc[(1, "decoder", "q"), "changed_step"]) == 2
    assert int(scoped.loc[(2, "vision", "q"), "changed_step"]) == 0
    assert int(scoped.loc[(2, "decoder", "q"), "changed_cumulative"]) == 7  # entries 0-1 moved twice, 2-6 once
    assert (steps.loc[steps["scope"] == "overall", "stack"] == "").all()
    # The principal figures of each row are its own stack's (the pairwise rollup's, first -> k).
    pairwise = principal_overlap(paths[0].parent, paths[2].parent, k=2, progress=False).by("module")
    for stack in ("vision", "decoder"):
        got = scoped.loc[(2, stack, "q"), "ratio_principal"]
        assert got == pytest.approx(pairwise.loc[(stack, "q"), "ratio_principal"], nan_ok=True)
    assert list(result.by("layer").index) == [("vision", 0), ("decoder", 0)]  # vision first, as data flows
    assert list(result.by("layer")[2]) == pytest.approx([1.0, 1 - 7 / 72])
    drawn = {f.name for f in trajectory_figures(result)}  # one line per (stack, module), one heatmap row per layer
    assert {"trajectory_step", "trajectory_cumulative", "trajectory_layers"} <= drawn
