"""Progress on stderr: bytes done and throughput. Silent with --quiet.

On a terminal, a bar. In a Jupyter notebook (stderr is no terminal there, but the cell redraws a line on a
carriage return), one line redrawn in place. Anywhere else (a CI log, a file), a plain line every few seconds, so a
long run shows that it is alive and how far it got: ``ckptdiff: comparing: 1.2 GiB of 3.4 GiB (35%), 250.0 MiB/s``,
and one last line when the run took long enough to print any. Every form counts in binary units (KiB, MiB, GiB).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PLAIN_INTERVAL_S = 5.0  # seconds between plain progress lines
NOTEBOOK_INTERVAL_S = 0.5  # seconds between redraws of a notebook's progress line
BAR_WIDTH = 20  # characters of a notebook's bar


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
        in_place = in_notebook()
        every = NOTEBOOK_INTERVAL_S if in_place else interval
        with _plain_lines(total, label, out, every, in_place=in_place) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class Sizes(ProgressColumn):
        """Bytes done of the total and the speed, in the binary units of the plain lines (rich's own are decimal)."""

        def render(self, task: Any) -> Text:
            speed = f", {size(task.speed)}/s" if task.speed else ""
            return Text(f"{size(task.completed)} of {size(task.total or 0)}{speed}", style="progress.download")

    columns = ("[progress.description]{task.description}", BarColumn(), Sizes(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=out), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel loaded): its stderr redraws a line on ``\\r``."""
    return "ipykernel" in sys.modules


@contextmanager
def _plain_lines(
    total: int, label: str, out: TextIO, interval: float, *, in_place: bool = False
) -> Iterator[Callable[[int], None]]:
    """A line every ``interval`` seconds from a background thread (also while nothing advances, e.g. an SVD);
    ``in_place``: the line redrawn after a carriage return, ended by a newline when the block ends."""
    done = [0]
    start = time.monotonic()
    stop = threading.Event()
    printed = [False]

    def line() -> None:
        elapsed = max(time.monotonic() - start, 1e-9)
        share = f" ({done[0] / total:.0%})" if total else ""
        bar = ""
        if in_place:
            filled = min(BAR_WIDTH, round(BAR_WIDTH * done[0] / total)) if total else 0
            bar = f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
        text = f"{bar}ckptdiff: {label}: {size(done[0])} of {size(total)}{share}, {size(done[0] / elapsed)}/s"
        try:
            print(text, file=out, flush=True, end="" if in_place else "\n")
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
        if in_place:
            print(file=out, flush=True)
