"""ckptdiff's one logger: warnings and notes the library raises for the caller to see (the CLI prints them on
stderr).

A library user sees them through :mod:`logging` like any other library's (``logging.getLogger("ckptdiff")``).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from ckptdiff.errors import printable

log = logging.getLogger("ckptdiff")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on whatever ``sys.stderr`` is when a line is written (a test runner swaps it per command)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """The stream is always the current stderr."""


class _Lowercase(logging.Formatter):
    """``ckptdiff: warning: ...``, ``ckptdiff: info: ...``: the level as the CLI's own lines write it."""

    def format(self, record: logging.LogRecord) -> str:
        return f"ckptdiff: {record.levelname.lower()}: {printable(record.getMessage())}"


def to_stderr(enabled: bool = True) -> None:
    """Print warnings and notes (``log.info``, such as tied tensors) as ``ckptdiff: warning: ...`` and ``ckptdiff:
    info: ...`` lines on stderr (what the CLI does), or nowhere; idempotent."""
    if any(getattr(h, "_ckptdiff", False) for h in log.handlers):
        return
    handler: logging.Handler = _Stderr() if enabled else logging.NullHandler()
    handler.setFormatter(_Lowercase())
    handler._ckptdiff = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
