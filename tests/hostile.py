"""Shared by the hostile-input test modules: run the CLI under a deadline and check a refusal's contract.

A refusal is exit 2 and one ``ckptdiff: error:`` line naming the input, no traceback, nothing written and no
temporary left. Cases that once hung run under an alarm so that a regression fails instead of blocking.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from typer.testing import CliRunner

from ckptdiff.cli import app

runner = CliRunner()
SECONDS = 20  # generous for a loaded CI machine: every case takes well under a second


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in ckptdiff swallows it."""


@contextmanager
def deadline(seconds: int = SECONDS) -> Iterator[None]:
    """Raise :class:`Hung` in the main thread if the block runs longer than ``seconds``."""

    def fire(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def invoke(args: list[str]) -> tuple[int, str, str, float]:
    """Exit code, stderr, all output and seconds taken of one CLI run under the deadline."""
    start = time.monotonic()
    with deadline(SECONDS):
        res = runner.invoke(app, args)
    return res.exit_code, res.stderr, res.output, time.monotonic() - start


def assert_refused(args: list[str], tmp_path: Path, names: list[str], expect: str) -> str:
    """Run the CLI; assert exit 2, one `ckptdiff: error:` line naming every one of ``names``, nothing written.

    The outputs checked are ``tmp_path/out.csv`` and ``tmp_path/out.json`` (pass them as destinations).
    """
    outputs = [tmp_path / "out.csv", tmp_path / "out.json"]
    code, stderr, output, took = invoke(args)
    lines = stderr.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("ckptdiff: error: "), stderr
    assert "Traceback" not in output and "internal error" not in output
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert expect in lines[0].replace(str(tmp_path), "<tmp>"), (expect, lines[0])  # not a word of the path
    assert not any(p.exists() for p in outputs)
    assert not list(tmp_path.glob(".out.*"))  # no temporary leftovers
    assert took < SECONDS
    return lines[0]
