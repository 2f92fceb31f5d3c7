"""Say at once that a signal was received, even while the main thread is inside one long call.

Python runs a signal handler in the main thread, between two bytecodes. While the main thread is inside one
long C call (a ``torch.linalg.svd`` of a large matrix takes seconds to minutes), Ctrl-C is only acted on when
that call returns, and until then nothing tells the user that it was received. This module's watcher closes
that gap: the C-level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``) the moment the
signal arrives, a thread reading that pipe waits a moment for the main thread to take the signal, and if it
has not, prints one line saying that the run stops once the computation in progress returns.

The watcher only speaks; it never stops anything. The main thread's handler (``ckptdiff.io.outputs``) still
raises the interrupt, so temporaries are removed and the exit code is the usual one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection

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
        """Restore the previous wake-up descriptor; the thread sees the pipe close and ends."""
        if self._pipe is None:
            return
        read_end, write_end = self._pipe
        self._pipe = None
        signal.set_wakeup_fd(self._previous)
        os.close(write_end)
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        os.close(read_end)

    def _watch(self, read_end: int, received: int) -> None:
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
