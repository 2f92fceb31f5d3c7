"""The ``ckptdiff`` command line: a thin layer that parses, calls one library function, and renders.

Each command lives in its own module and registers itself on :data:`app`. User-facing failures
(:class:`~ckptdiff.errors.CkptdiffError`) become one line on stderr and exit code 2; set
``CKPTDIFF_DEBUG=1`` to see the traceback instead. Ctrl-C, SIGTERM and SIGHUP remove every temporary output
file and exit with 128 + the signal number (130, 143, 129) and one line. A closed stdout (``| head``) is not an
error: printing stops quietly and the exit status is the command's own (click's own ``--help`` still exits 1).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from ckptdiff import __version__
from ckptdiff.errors import printable


def _flags_without_metavar(params: list[click.Parameter]) -> list[click.Parameter]:
    """typer labels plain flags (``--quiet``, ``--help``) ``<bool>`` in --help; a flag takes no value, so none."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _flags_without_metavar(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _flags_without_metavar(super().get_params(ctx))

    def main(  # type: ignore[override]  # windows_expand_args (newer typer) passes through **extra
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """As click's, but a usage error (a bad option value, an unknown option, a missing argument) is one
        ``ckptdiff: error:`` line naming the command's --help, like every other bad input, not a boxed usage."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except Exception as e:
            if not _is_usage_error(e):
                raise
            message: str = getattr(e, "format_message")()  # noqa: B009 - a click UsageError, told by shape
            exit_code: int = getattr(e, "exit_code", 2)
            if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help (rich has printed it already)
                if message.strip():
                    typer.echo(message)
                sys.exit(exit_code)
            ctx = getattr(e, "ctx", None)
            where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            typer.echo(f"ckptdiff: error: {printable(message.rstrip('.'))}{where}", err=True)
            sys.exit(exit_code)
        sys.exit(code if isinstance(code, int) else 0)  # an int here is an Exit's code; commands return None


def _is_usage_error(e: Exception) -> bool:
    """click's UsageError (typer's public API exports only its BadParameter subclass), told by its shape."""
    return isinstance(e, typer.BadParameter) or any(k.__name__ == "UsageError" for k in type(e).__mro__)


app = typer.Typer(
    cls=_Group,
    name="ckptdiff",
    help="Checkpoint forensics: what did this fine-tune actually do to the weights?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

P = ParamSpec("P")
# 0 in a single process; under torchrun (WORLD_SIZE > 1) -1 until the process group is joined, then the rank.
_RANK = -1 if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
R = TypeVar("R")


def _fail(message: str, code: int) -> typer.Exit:
    if _RANK == 0:  # under torchrun, every rank stops with the same code; rank 0 alone says why
        typer.echo(f"ckptdiff: error: {printable(message)}", err=True)
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map library failures to one line on stderr and a non-zero exit (traceback with CKPTDIFF_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from ckptdiff.errors import CkptdiffError
        from ckptdiff.log import to_stderr
        from ckptdiff.runtime.signals import signals_as_interrupts

        to_stderr(enabled=_RANK == 0)  # under torchrun, rank 0 alone speaks

        debug = os.environ.get("CKPTDIFF_DEBUG", "") not in ("", "0")
        try:
            with signals_as_interrupts(speak=_RANK == 0):
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


def _version(value: bool) -> None:
    if value:
        from ckptdiff.cli.options import stdout_may_close

        with stdout_may_close():
            typer.echo(f"ckptdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    hub_stream: bool = typer.Option(
        False,
        "--hub-stream",
        help="Read Hub ids (org/name) by byte range straight from the Hub: nothing is written to disk; each byte "
        "still crosses the network once. Same as CKPTDIFF_HUB_STREAM=1. Put it before the command.",
    ),
) -> None:
    """Checkpoint forensics: what did this fine-tune actually do to the weights?"""
    if hub_stream:
        os.environ["CKPTDIFF_HUB_STREAM"] = "1"  # read by sources.resolve for every Hub id of this run


def _register() -> None:
    from ckptdiff.cli import check, consistency, principal, report, sparsity, spectral

    for module in (sparsity, principal, spectral, consistency, report, check):
        module.register(app)
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = _Command


_register()


def main() -> None:
    """Console-script entry point."""
    # OpenMP threads that spin while waiting make LAPACK (the SVDs) tens of times slower when the machine is
    # shared or oversubscribed; passive waiting costs nothing measurable here. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _RANK < 0:  # launched by torchrun with several ranks
        _run_as_rank()
    else:
        app(prog_name="ckptdiff")


def _run_as_rank() -> None:
    """One torchrun rank: join the process group, run the command; rank 0 alone prints and writes."""
    global _RANK
    from ckptdiff.runtime import distributed

    device = "auto"
    if "--device" in sys.argv[:-1]:
        device = sys.argv[sys.argv.index("--device") + 1]
    try:
        world = distributed.init_from_env(device)
    except Exception as e:
        typer.echo(f"ckptdiff: error: cannot join the torchrun process group ({e}); check the launch", err=True)
        raise SystemExit(2) from None
    _RANK = world.rank if world is not None else 0
    if _RANK != 0:
        devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for the life of the process
        sys.stdout = devnull
    signalled = False
    try:
        app(prog_name="ckptdiff")
    except SystemExit as e:
        signalled = e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)
        raise
    finally:
        distributed.shutdown(wait=not signalled)


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
