"""The claims of examples/README.md still hold: recompute every analysis on the shipped checkpoints and compare.

Three layers: (1) live recomputation agrees with examples/results.json (every figure, every direction, every
verdict); (2) the generated block of the README is exactly what results.json renders to; (3) the hand-written
prose's statements (verdicts, "about twice", directions) hold in the live numbers. A failure means: rerun
``python -m examples.analyze`` and, if a verdict or direction changed, rewrite the prose of examples/README.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from examples import analyze as A

# The verdicts the hand-written "What this shows" section of examples/README.md is written around.
PROSE_VERDICTS = {
    "1_sparsity": "reproduced",
    "2a_principal": "explained by update size",
    "2b_low": "explained by update size",
    "2c_sft_principal": "not reproduced",
    "2d_energy": "not reproduced",
    "3a_drift": "explained by update size",
    "3b_rotation": "reproduced",
    "4_consistency": "reproduced",
}
REL = 1e-3  # results.json keeps 6 significant digits; fp64 SVDs may differ in the last bits across machines

Live = tuple[dict[str, A.Figures], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    return json.loads(A.RESULTS.read_text())


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as analyze runs it; also far faster on a loaded machine
    try:
        figs = {name: A.measure_run(name) for name in A.FINE_TUNES}
        pairs = A.measure_pairs()
    finally:
        torch.set_num_threads(threads)
    yield figs, pairs


def test_stored_verdicts_are_the_ones_the_prose_describes(stored: dict[str, Any]) -> None:
    got = {c["id"]: c["verdict"] for c in stored["claims"]}
    assert got == PROSE_VERDICTS, "a verdict changed: rewrite 'What this shows' in examples/README.md"
    assert all(v in A.VERDICTS for v in got.values())


def test_live_figures_match_results_json(live: Live, stored: dict[str, Any]) -> None:
    figs, pairs = live
    for name in A.FINE_TUNES:
        for key, value in figs[name].items():
            assert math.isclose(value, stored["figures"][name][key], rel_tol=REL), (name, key)
    assert len(pairs) == len(stored["pairs"]) == 10
    for p, q in zip(pairs, stored["pairs"], strict=True):
        assert (p["run_a"], p["run_b"]) == (q["run_a"], q["run_b"])
        for key in ("jaccard", "jaccard_random", "jaccard_magnitude"):
            assert math.isclose(p[key], q[key], rel_tol=REL), (p["run_a"], p["run_b"], key)


def test_live_directions_and_verdicts_match_results_json(live: Live, stored: dict[str, Any]) -> None:
    figs, pairs = live
    recomputed = A.claims(figs, pairs)
    assert [c.id for c in recomputed] == [c["id"] for c in stored["claims"]]
    for claim, saved in zip(recomputed, stored["claims"], strict=True):
        assert claim.naive.holds == saved["naive"]["holds"], (claim.id, claim.naive.text)
        assert [t.holds for t in claim.controls] == [t["holds"] for t in saved["controls"]], claim.id
        assert claim.verdict == saved["verdict"], claim.id


def test_readme_generated_block_is_current(stored: dict[str, Any]) -> None:
    text = A.README.read_text()
    assert A.render(stored) in text, "examples/README.md is stale: run python -m examples.analyze"
    assert text.index(A.END) > text.index(A.BEGIN)


def test_prose_statements_hold_in_live_numbers(live: Live) -> None:
    """Each sentence of 'What this shows' that states a direction, checked on the recomputed figures."""
    f, pairs = live
    rl = [f[r] for r in A.RL_RUNS]
    # (1) RL sparser than SFT; at matched lr "about twice"; at matched update norm still RL's side, but smaller.
    assert all(r["sparsity"] > 3 * f["sft"]["sparsity"] for r in rl)
    for rl_run, sft_run in (("rl_seed1", "sft_lr_rl"), ("rl_lr_sft", "sft")):
        assert 1.5 < f[rl_run]["sparsity"] / f[sft_run]["sparsity"] < 2.5
        assert f[rl_run]["update_norm"] < 0.7 * f[sft_run]["update_norm"]  # "about half of SFT's"
    matched = f["rl_lr_sft"]["sparsity"] / A.at_matched_norm(f, "sparsity")
    assert 1 + A.BAND < matched < 1.5
    # (2) RL below α on principal, above α on low-magnitude; every run within the band of its magnitude-matched
    # baseline; SFT not above α; E_k far above random for all, RL above SFT.
    assert all(r["overlap_principal"] < A.ALPHA and r["overlap_low"] > A.ALPHA for r in rl)
    for name in A.FINE_TUNES:
        assert abs(f[name]["ratio_principal_magnitude"] - 1) <= A.BAND, name
        assert abs(f[name]["ratio_low_magnitude"] - 1) <= A.BAND, name
        assert f[name]["energy_vs_random"] > 10, name
    assert f["sft"]["overlap_principal"] <= A.ALPHA * (1 + A.BAND)
    assert all(r["energy_principal"] > f["sft"]["energy_principal"] for r in rl)
    # (3) NSS about ten times smaller for RL; per unit update nearly equal and rising with update size; every
    # run drifts more than its equal-norm null; RL's angle / null below 1 and below SFT's.
    assert all(r["nss_median"] < 0.2 * f["sft"]["nss_median"] for r in rl)
    by_size = sorted(("rl_seed1", "sft_lr_rl", "rl_lr_sft", "sft"), key=lambda n: f[n]["update_norm"])
    per_unit = [f[n]["nss_per_update"] for n in by_size]
    assert per_unit == sorted(per_unit) and max(per_unit) < 1.15 * min(per_unit)
    assert all(f[n]["nss_null_ratio"] > 1 for n in A.FINE_TUNES)
    assert all(r["angle_null_ratio"] < min(1.0, f["sft"]["angle_null_ratio"]) for r in rl)
    # (4) RL seeds agree beyond both baselines; cross-method pairs stay near theirs.
    by_pair = {frozenset((p["run_a"], p["run_b"])): p for p in pairs}
    rr = by_pair[frozenset(A.RL_RUNS)]
    assert rr["jaccard"] > rr["jaccard_magnitude"] * (1 + A.BAND) > rr["jaccard_random"]
    assert rr["same_sign"] > 0.9
    others = [p for key, p in by_pair.items() if key != frozenset(A.RL_RUNS)]
    assert all(p["vs_magnitude"] < rr["vs_magnitude"] for p in others)
