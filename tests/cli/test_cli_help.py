"""The help a new user reads first (issue 23 items 6, 7, 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("args", [["--help"], ["sparsity", "--help"]])
def test_help_into_a_closed_pipe_exits_0(args: list[str]) -> None:
    """`ckptdiff --help | head -1`: the reader is gone before the help is written; that is not a failure."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptdiff", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has started: every write of the help meets a closed pipe
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
