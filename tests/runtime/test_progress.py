"""Progress on stderr: one unit everywhere, a line redrawn in place in a notebook (issue 23 items 8, 13)."""

from __future__ import annotations

import io
import sys
import time

import pytest

from ckptdiff.runtime import progress
from ckptdiff.runtime.progress import byte_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(out: io.StringIO, total: int, steps: int, pause: float) -> None:
    with byte_progress(total, "comparing", stream=out, interval=0.01) as advance:
        for _ in range(steps):
            advance(total // steps)
            time.sleep(pause)


def test_the_bar_counts_in_the_binary_units_of_the_plain_lines() -> None:
    out = _Terminal()
    _run(out, 3 * 2**20, 3, 0.15)
    text = out.getvalue()
    assert "MiB" in text  # 3 MiB is 3.1 MB: rich's own column would say MB
    assert " MB" not in text and "3.1" not in text


def test_plain_lines_count_in_binary_units() -> None:
    out = io.StringIO()
    _run(out, 3 * 2**20, 3, 0.05)
    lines = out.getvalue().splitlines()
    assert lines and lines[-1].startswith("ckptdiff: comparing: 3.0 MiB of 3.0 MiB (100%)")


def test_a_notebook_gets_one_line_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipykernel", type(sys)("ipykernel"))  # as inside a Jupyter kernel
    monkeypatch.setattr(progress, "NOTEBOOK_INTERVAL_S", 0.01)
    out = io.StringIO()  # a notebook's stderr is no terminal
    _run(out, 4 * 2**20, 4, 0.05)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1, repr(text[:200])
    last = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("[" + "#" * progress.BAR_WIDTH + "] ckptdiff: comparing: 4.0 MiB of 4.0 MiB (100%)")


def test_not_in_a_notebook_lines_are_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    out = io.StringIO()
    _run(out, 2**20, 2, 0.05)
    assert "\r" not in out.getvalue() and out.getvalue().count("\n") >= 2
