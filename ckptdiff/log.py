"""ckptdiff's one logger: warnings the library raises for the caller to see (the CLI prints them on stderr).

A library user sees them through :mod:`logging` like any other library's (``logging.getLogger("ckptdiff")``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("ckptdiff")


def to_stderr(enabled: bool = True) -> None:
    """Print warnings as ``ckptdiff: warning: ...`` lines on stderr (what the CLI does), or nowhere; idempotent."""
    if any(getattr(h, "_ckptdiff", False) for h in log.handlers):
        return
    handler: logging.Handler = logging.StreamHandler() if enabled else logging.NullHandler()
    handler.setFormatter(logging.Formatter("ckptdiff: %(levelname)s: %(message)s"))
    handler._ckptdiff = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
