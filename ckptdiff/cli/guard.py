"""Every command runs inside :func:`handle_errors`: library failures become one line and an exit code.

A :class:`~ckptdiff.errors.CkptdiffError` is one ``ckptdiff: error:`` line on stderr and its exit code (2 for bad
input); ``CKPTDIFF_DEBUG=1`` shows the traceback instead. Ctrl-C, SIGTERM and SIGHUP remove every temporary output
file and exit with 128 + the signal number (130, 143, 129) and one line. Out of memory and internal errors are
exit 3. Under torchrun every rank stops with the same code and rank 0 alone says why (:data:`RANK`).
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from ckptdiff.errors import printable

P = ParamSpec("P")
R = TypeVar("R")
# 0 in a single process; under torchrun (WORLD_SIZE > 1) -1 until the process group is joined, then the rank.
RANK = [-1 if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0]


def _fail(message: str, code: int) -> typer.Exit:
    """One error line (rank 0 only) and the exit that carries ``code``."""
    if RANK[0] == 0:  # under torchrun, every rank stops with the same code; rank 0 alone says why
        typer.echo(f"ckptdiff: error: {printable(message)}", err=True)
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map library failures to one line on stderr and a non-zero exit (traceback with CKPTDIFF_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from ckptdiff.errors import CkptdiffError, command_line
        from ckptdiff.log import to_stderr
        from ckptdiff.runtime.signals import signals_as_interrupts

        to_stderr(enabled=RANK[0] == 0)  # under torchrun, rank 0 alone speaks

        debug = os.environ.get("CKPTDIFF_DEBUG", "") not in ("", "0")
        try:
            with signals_as_interrupts(speak=RANK[0] == 0), command_line():  # messages name flags, not keywords
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except CkptdiffError as e:
            if debug:
                raise
            raise _fail(str(e), e.exit_code) from None
        except KeyboardInterrupt as e:
            raise _fail(*_interrupted(e)) from None
        except MemoryError:
            if debug:
                raise
            raise _fail("out of memory; try --device cpu, fewer tensors (--include), or a larger machine", 3) from None
        except Exception as e:
            if debug:
                raise
            if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
                raise _fail("the GPU ran out of memory; try --device cpu or a smaller --batch-budget", 3) from None
            raise _fail(
                f"internal error ({type(e).__name__}: {e}); rerun with CKPTDIFF_DEBUG=1 and report the traceback", 3
            ) from None

    return wrapper


def _interrupted(e: KeyboardInterrupt) -> tuple[str, int]:
    """The message and exit code for Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."""
    from ckptdiff.runtime.signals import Interrupted

    if not isinstance(e, Interrupted):
        return "interrupted; no output file was written", 130
    how = "interrupted" if e.signum == signal.SIGINT else f"stopped by {signal.Signals(e.signum).name}"
    if e.after_commit:
        return f"{how} after the output files were written", e.exit_code
    return f"{how}; no output file was written", e.exit_code
