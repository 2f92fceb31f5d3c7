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


HEAVY = ("torch", "pandas", "numba", "matplotlib")
_PROBE = """
import sys
from ckptdiff.cli.app import app
try:
    app(sys.argv[1:], prog_name="ckptdiff")
except SystemExit as e:
    print("exit", e.code)
print("heavy", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["sparsity", "{base}", "{typo}"],
        ["spectral", "{base}", "{ok}", "--json", "/proc/ckptdiff-x.json"],
        ["principal-overlap", "{typo}", "{ok}"],
        ["consistency", "{base}", "{ok}", "{typo}"],
        ["report", "{base}", "{typo}", "-o", "{tmp}/rep"],
        ["check", "{base}", "{typo}", "--same-keys"],
    ],
)
def test_bad_paths_fail_before_anything_heavy_loads(args: list[str], tmp_path: Path) -> None:
    """A mistyped path or an unwritable destination is refused before torch, pandas, numba or matplotlib are
    imported, so it fails about as fast as --help (issue 23 item 9, issue 26 item 3); the path gets a did-you-mean."""
    (tmp_path / "rl_seed1").mkdir()
    (tmp_path / "rl_seed1" / "model.safetensors").write_bytes(b"")
    names = {"base": str(tmp_path / "rl_seed1"), "ok": str(tmp_path / "rl_seed1"), "typo": str(tmp_path / "rl_sed1")}
    argv = [a.format(tmp=tmp_path, **names) for a in args]
    probe = _PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=_env(), timeout=60)
    assert "exit 2" in done.stdout, (done.stdout, done.stderr)
    assert done.stdout.strip().endswith("heavy"), done.stdout  # none of them was imported
    assert done.stderr.startswith("ckptdiff: error:") and done.stderr.count("\n") == 1, done.stderr
    if "{typo}" in args:
        assert f"did you mean {tmp_path / 'rl_seed1'}?" in done.stderr


def test_import_ckptdiff_stays_lazy() -> None:
    probe = f"import sys, ckptdiff; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.stdout.strip() == "", done.stdout
