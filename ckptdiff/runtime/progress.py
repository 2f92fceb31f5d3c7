"""Progress on stderr: bytes done and throughput. Silent with --quiet.

On a terminal, a bar. Anywhere else (a CI log, a file), a plain line every few seconds, so a long run shows
that it is alive and how far it got: ``ckptdiff: comparing: 1.2 GiB of 3.4 GiB (35%), 250.0 MiB/s``, and one
last line when the run took long enough to print any.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

PLAIN_INTERVAL_S = 5.0  # seconds between plain progress lines


def size(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.0 MiB``, ``3.4 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def byte_progress(
    total: int,
    label: str,
    enabled: bool = True,
    *,
    stream: TextIO | None = None,
    interval: float = PLAIN_INTERVAL_S,
) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking a number of bytes done; shows progress on ``stream`` (stderr) while the block runs."""
    out = stream if stream is not None else sys.stderr
    if not enabled:
        yield lambda _n: None
        return
    if not out.isatty():
        with _plain_lines(total, label, out, interval) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=out), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _plain_lines(total: int, label: str, out: TextIO, interval: float) -> Iterator[Callable[[int], None]]:
    """A line every ``interval`` seconds from a background thread (also while nothing advances, e.g. an SVD)."""
    done = [0]
    start = time.monotonic()
    stop = threading.Event()
    printed = [False]

    def line() -> None:
        elapsed = max(time.monotonic() - start, 1e-9)
        share = f" ({done[0] / total:.0%})" if total else ""
        try:
            print(
                f"ckptdiff: {label}: {size(done[0])} of {size(total)}{share}, {size(done[0] / elapsed)}/s",
                file=out,
                flush=True,
            )
            printed[0] = True
        except (OSError, ValueError):  # stderr closed: progress is not worth failing for
            stop.set()

    def beat() -> None:
        while not stop.wait(interval):
            line()

    def advance(n: int) -> None:
        done[0] += n

    thread = threading.Thread(target=beat, name="ckptdiff-progress", daemon=True)
    thread.start()
    try:
        yield advance
    finally:
        stop.set()
        thread.join()
    if printed[0]:
        line()  # where it ended, when the run was long enough to show progress at all
