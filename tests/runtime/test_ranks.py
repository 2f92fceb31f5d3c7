"""Several ranks under torchrun: the same results as one process, printed once, and failures that stop every rank.

Each torchrun launch costs a few seconds, so the launches here are few and each checks several things.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factory import bump_ulps, llama_like, save_single

from ckptdiff.runtime.distributed import balance

ROOT = Path(__file__).resolve().parents[2]
UP0 = "model.layers.0.mlp.up_proj.weight"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CKPTDIFF_DEBUG="")
    return env


def _torchrun(*args: str, script: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    target = [str(script)] if script is not None else ["-m", "ckptdiff"]
    return subprocess.run(
        [*launcher, *target, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )


def _single(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptdiff", *args], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ckptdiff: error:")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("ranks")
    base = llama_like(layers=3, d=24, ff=40, seed=5)
    ft = {k: v.clone() for k, v in base.items()}
    for name in list(base)[1::2]:  # every other tensor moves a little
        ft[name] = bump_ulps(base[name], torch.arange(0, base[name].numel(), 3), 2)
    return str(save_single(base, tmp / "base.safetensors")), str(save_single(ft, tmp / "ft.safetensors"))


def _on_rank1(path: Path, action: str) -> Path:
    """A script that runs ckptdiff's CLI with ``action`` planted in rank 1's spectral batches."""
    path.write_text(
        textwrap.dedent(
            """
            import os
            import signal
            import sys

            from ckptdiff.analyses.spectral import SpectralAnalysis

            real = SpectralAnalysis.on_batch

            def on_batch(self, items, stacks):
                if os.environ["RANK"] == "1":
                    ACTION
                return real(self, items, stacks)

            SpectralAnalysis.on_batch = on_batch
            from ckptdiff.cli import main

            sys.argv[0] = "ckptdiff"
            main()
            """
        ).replace("ACTION", action)
    )
    return path


def test_two_ranks_give_one_process_results_printed_once(pair: tuple[str, str], tmp_path: Path) -> None:
    # report covers every kind of unit: 1-D tensors read in chunks (sparsity only), matrices in SVD batches.
    args = ["--k", "4", "--null", "random", "-q"]
    single = _single("report", *pair, "-o", str(tmp_path / "one"), *args)
    ranks = _torchrun("report", *pair, "-o", str(tmp_path / "two"), *args)
    assert single.returncode == 0 and ranks.returncode == 0, ranks.stderr[-2000:]
    for name in ("tensors.csv", "figures"):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        if one.is_file():  # same rows, counts exact, floats bit-identical
            assert one.read_bytes() == two.read_bytes()
        else:
            assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert ranks.stdout.count("Report written to") == 1  # rank 0 alone prints
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left by rank 1


def test_bad_input_is_reported_once_and_stops_every_rank(pair: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    ranks = _torchrun("sparsity", pair[0], str(tmp_path / "missing"), "--csv", str(out), "-q", timeout=60)
    assert ranks.returncode != 0
    assert len(_errors(ranks.stderr)) == 1 and "missing" in _errors(ranks.stderr)[0]
    assert "exitcode: 2" in ranks.stderr  # torchrun's summary: a rank ended with ckptdiff's code for bad input
    assert not out.exists()


def test_a_failing_rank_stops_the_others_without_a_hang(pair: tuple[str, str], tmp_path: Path) -> None:
    script = _on_rank1(tmp_path / "fail_on_rank1.py", 'raise RuntimeError("planted failure")')
    out = tmp_path / "s.csv"
    ranks = _torchrun("spectral", *pair, "--k", "4", "--csv", str(out), "-q", script=script, timeout=90)
    assert ranks.returncode != 0
    errors = _errors(ranks.stderr)
    assert len(errors) == 1 and "planted failure" in errors[0] and "rank 1" in errors[0]
    assert not out.exists()


def test_a_signal_on_one_rank_stops_every_rank_at_once(pair: tuple[str, str], tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 while it measures: rank 0, waiting for it in the step's exchange, learns of it there
    and stops too, instead of waiting until torchrun kills it (30 s after rank 1 gave up, and only once rank 1 has
    left its closing barrier)."""
    script = _on_rank1(tmp_path / "term_on_rank1.py", "os.kill(os.getpid(), signal.SIGTERM)")
    out = tmp_path / "s.csv"
    ranks = _torchrun("spectral", *pair, "--k", "4", "--csv", str(out), "-q", script=script, timeout=60)
    assert ranks.returncode != 0
    assert _errors(ranks.stderr) == ["ckptdiff: error: stopped by SIGTERM on rank 1; no output file was written"]
    assert "forcefully" not in ranks.stderr and "exitcode: 143" in ranks.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("costs", "ranks", "owners"),
    [
        ([5.0, 4.0, 3.0, 3.0, 1.0], 2, [0, 1, 1, 0, 1]),  # 5 | 4, then 3 onto the 4, 3 onto the 5, 1 onto the 7
        ([1.0, 1.0, 1.0, 1.0], 2, [0, 1, 0, 1]),  # ties go to the lower rank, the lower index first
        ([2.0], 3, [0]),
        ([], 2, []),
    ],
)
def test_balance_gives_longest_first_to_the_least_loaded(costs: list[float], ranks: int, owners: list[int]) -> None:
    assert balance(costs, ranks) == owners


def test_trajectory_under_two_ranks_writes_the_one_process_files_once(pair: tuple[str, str], tmp_path: Path) -> None:
    """The trajectory plug-in's accumulators are its state fields: ranks split the tensors, rank 0 writes."""
    base, ft = pair
    run = [base, ft, base]  # out and back: step 2 undoes step 1
    single = _single("trajectory", *run, "-o", str(tmp_path / "one"), "-q")
    ranks = _torchrun("trajectory", *run, "-o", str(tmp_path / "two"), "-q")
    assert single.returncode == 0 and ranks.returncode == 0, ranks.stderr[-2000:]
    for name in ("steps.csv", "tensors.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert ranks.stdout.count("Report written to") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
