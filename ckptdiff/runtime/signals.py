"""Signals as interrupts: SIGINT, SIGTERM and SIGHUP stop a run cleanly, and are said at once.

:func:`signals_as_interrupts` makes the three signals raise :class:`Interrupted` in the main thread, so every
temporary output is removed on the way out and the exit code is 128 + the signal number; :func:`signals_held`
defers them across steps that must finish together (renaming outputs into place, a rank exchange).

Saying it at once, even while the main thread is inside one long call:

Python runs a signal handler in the main thread, between two bytecodes. While the main thread is inside one
long C call (a ``torch.linalg.svd`` of a large matrix takes seconds to minutes), Ctrl-C is only acted on when
that call returns, and until then nothing tells the user that it was received. This module's watcher closes
that gap: the C-level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``) the moment the
signal arrives, a thread reading that pipe waits a moment for the main thread to take the signal, and if it
has not, prints one line saying that the run stops once the computation in progress returns.

The watcher only speaks; it never stops anything. The main thread's handler (:func:`signals_as_interrupts`) still
raises the interrupt, so temporaries are removed and the exit code is the usual one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from types import FrameType

GRACE_S = 0.2  # the main thread takes a signal within microseconds when it runs Python; this is ample


class Watcher:
    """Reads the signal wake-up pipe in a thread; see the module doc. Start and stop it in the main thread."""

    def __init__(self, signals: Collection[int], handled: Callable[[], int], speak: bool = True):
        self._signals = frozenset(int(s) for s in signals)
        self._handled = handled  # how many of those signals the main thread's handler has taken so far
        self._speak = speak
        self._pipe: tuple[int, int] | None = None
        self._previous = -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Route wake-up bytes to this watcher's pipe and start its thread; without a pipe (no descriptors left,
        not the main thread) there is no watcher, and signals are still handled as before."""
        base = self._handled()
        try:
            read_end, write_end = os.pipe()
        except OSError:
            return
        try:
            os.set_blocking(write_end, False)  # the C handler must never block
            self._previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except (OSError, ValueError):
            os.close(read_end)
            os.close(write_end)
            return
        self._pipe = (read_end, write_end)
        self._thread = threading.Thread(target=self._watch, args=(read_end, base), name="ckptdiff-signals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Restore the previous wake-up descriptor; the thread sees the pipe close, ends, and closes its read end.

        The read end is the thread's to close: were it closed here while the thread is still in its grace wait (a
        loaded machine), the next run's pipe could reuse the descriptor number and this thread would read, and
        swallow, that run's wake-up bytes."""
        if self._pipe is None:
            return
        _, write_end = self._pipe
        self._pipe = None
        signal.set_wakeup_fd(self._previous)
        os.close(write_end)
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _watch(self, read_end: int, received: int) -> None:
        try:
            self._watch_pipe(read_end, received)
        finally:
            os.close(read_end)

    def _watch_pipe(self, read_end: int, received: int) -> None:
        """``received`` starts at the handler's count when the watcher started (that count is per process)."""
        said = False
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            received += sum(1 for b in data if b in self._signals)
            before = self._handled()
            deadline = time.monotonic() + GRACE_S
            while self._handled() < received and time.monotonic() < deadline:
                time.sleep(0.01)
            taken = self._handled()
            if taken < received and taken == before and not said and self._speak:
                said = True
                name = signal.Signals(data[-1]).name if data[-1] in self._signals else "signal"
                how = "interrupted" if name == "SIGINT" else f"{name} received"
                lead = "\n" if sys.stderr.isatty() else ""  # off the progress bar's line
                what = "stopping when the step in progress returns (a matrix decomposition cannot be cut short)"
                sys.stderr.write(f"{lead}ckptdiff: {how}: {what}\n")
                sys.stderr.flush()
            if taken != before and taken < received:
                # The handler ran, so it has taken every signal read so far: signals of one kind that arrive
                # together reach it once. Level the counts rather than let them drift apart.
                received = taken


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so that temporaries are removed on the way out.

    A KeyboardInterrupt, so code that handles Ctrl-C handles the others alike. The CLI exits with
    ``128 + signum`` (130, 143, 129), the shell's convention for a process ended by that signal.
    """

    def __init__(self, signum: int, after_commit: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.after_commit = after_commit  # the run's output files were already in place

    @property
    def exit_code(self) -> int:
        """128 + the signal number."""
        return 128 + self.signum


_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_state: dict[str, object] = {"held": None, "committed": False}
_taken = [0]  # signals the main thread's handler has taken (ckptdiff.runtime.signals compares with those received)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _taken[0] += 1
    held = _state["held"]
    if isinstance(held, list):
        held.append(signum)  # renames in progress: finish them first
        return
    raise Interrupted(signum, after_commit=bool(_state["committed"]))


def note_commit() -> None:
    """The run's output is in place: an interrupt from now on says so (see :class:`Interrupted`)."""
    _state["committed"] = True


@contextmanager
def signals_held() -> Iterator[None]:
    """Defer the handled signals to the end of the block (only where :func:`signals_as_interrupts` is active)."""
    if _state["held"] is not None:
        yield
        return
    held: list[int] = []
    _state["held"] = held
    try:
        yield
    finally:
        _state["held"] = None
    if held:
        raise Interrupted(held[0], after_commit=bool(_state["committed"]))


@contextmanager
def signals_as_interrupts(speak: bool = True) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread.

    A signal the process was started ignoring (``nohup`` ignores SIGHUP, ``&`` in a script SIGINT) stays
    ignored. Outside the main thread this does nothing (Python delivers signals to the main thread only).
    While the main thread is inside one long call (an SVD), a line on stderr says at once that the run stops
    when it returns (:mod:`ckptdiff.runtime.signals`; ``speak=False`` keeps it quiet, as on ranks other than 0).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    _state["committed"] = False
    watcher = Watcher(_HANDLED, lambda: _taken[0], speak=speak)
    watcher.start()  # first: a signal during its set-up finds the previous handlers, and nothing half-installed
    try:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, _on_signal)
        yield
    finally:
        watcher.stop()
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
