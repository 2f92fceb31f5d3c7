"""The ``ckptdiff`` application: the one table of commands, the root options, and the entry point.

A command is a function in its own module under ``ckptdiff/cli/`` (its docstring is its ``--help``, its module's
``EPILOG`` the example under it); :data:`COMMANDS` registers each, wrapped in :func:`ckptdiff.cli.guard.handle_errors`.
Command modules never import this one.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from ckptdiff import __version__
from ckptdiff.cli import check, consistency, patch, principal, report, sparsity, spectral, trajectory
from ckptdiff.cli.guard import RANK, handle_errors
from ckptdiff.cli.options import with_as_stored
from ckptdiff.errors import printable

# name, function, example epilog: the order of `ckptdiff --help`
COMMANDS: tuple[tuple[str, Callable[..., None], str], ...] = (
    ("sparsity", sparsity.sparsity, sparsity.EPILOG),
    ("principal-overlap", principal.principal_overlap, principal.EPILOG),
    ("spectral", spectral.spectral, spectral.EPILOG),
    ("consistency", consistency.consistency, consistency.EPILOG),
    ("report", report.report, report.EPILOG),
    ("trajectory", trajectory.trajectory, trajectory.EPILOG),
    ("check", check.check, check.EPILOG),
    ("patch", patch.app, patch.EPILOG),  # a group: its subcommands are guarded where they are declared
)


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """typer labels plain flags (``--quiet``, ``--help``) ``<bool>`` in --help; a flag takes no value, so none."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


def _help_may_close(format_help: Callable[[Any, Any], None], ctx: Any, formatter: Any) -> None:
    """``ckptdiff --help | head -1``: a reader that stops reading the help is not an error (exit 0, as for a
    command's output), where click would exit 1."""
    from ckptdiff.cli.options import stdout_may_close

    try:
        with stdout_may_close():
            format_help(ctx, formatter)
    except SystemExit as e:  # rich's Console.on_broken_pipe: stdout already points at os.devnull, then exit 1
        if e.code != 1:
            raise


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``BASE FT...``, where typer writes ``{BASE} {FT}...``: braces mark nothing a user types."""
        pieces = super().collect_usage_pieces(ctx)
        return [p.replace("{", "").replace("}", "").replace("......", "...") for p in pieces]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _help_may_close(super().format_help, ctx, formatter)


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _help_may_close(super().format_help, ctx, formatter)

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


def _version(value: bool) -> None:
    if value:
        from ckptdiff.cli.options import stdout_may_close

        with stdout_may_close():
            typer.echo(f"ckptdiff {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    hub_stream: bool = typer.Option(
        False,
        "--hub-stream",
        help="Read Hub ids (org/name) by byte range straight from the Hub: nothing is written to disk; each byte "
        "still crosses the network once. Same as CKPTDIFF_HUB_STREAM=1. Put it before the command.",
    ),
    host: bool = typer.Option(
        False,
        "--host",
        help="Record this machine's host name in every report header (left out by default: reports are pasted into "
        "model cards and pull requests). Same as CKPTDIFF_HOST=1. Put it before the command.",
    ),
) -> None:
    """Checkpoint forensics: what did this fine-tune actually do to the weights?"""
    if hub_stream:
        os.environ["CKPTDIFF_HUB_STREAM"] = "1"  # read by io.resolve for every Hub id of this run
    if host:
        os.environ["CKPTDIFF_HOST"] = "1"  # read by engine.header for every header of this run


def make_app(commands: Sequence[tuple[str, Callable[..., None], str]] = COMMANDS) -> typer.Typer:
    """The application with ``commands`` (name, function, epilog) registered in order, each under the guard."""
    made = typer.Typer(
        cls=_Group,
        name="ckptdiff",
        help="Checkpoint forensics: what did this fine-tune actually do to the weights?",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )
    made.callback()(_root)
    for name, command, epilog in commands:
        if isinstance(command, typer.Typer):  # a group of subcommands (``ckptdiff patch create ...``)
            for info in command.registered_commands:
                if info.cls in (None, TyperCommand):
                    info.cls = _Command
            made.add_typer(command, name=name, epilog=epilog, cls=_Group)
        else:
            made.command(name, epilog=epilog, cls=_Command)(handle_errors(with_as_stored(command)))
    return made


app = make_app()


def main() -> None:
    """Console-script entry point."""
    # OpenMP threads that spin while waiting make LAPACK (the SVDs) tens of times slower when the machine is
    # shared or oversubscribed; passive waiting costs nothing measurable here. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if RANK[0] < 0:  # launched by torchrun with several ranks
        _run_as_rank()
    else:
        app(prog_name="ckptdiff")


def _run_as_rank() -> None:
    """One torchrun rank: join the process group, run the command; rank 0 alone prints and writes."""
    from ckptdiff.runtime import distributed

    device = "auto"
    if "--device" in sys.argv[:-1]:
        device = sys.argv[sys.argv.index("--device") + 1]
    try:
        world = distributed.init_from_env(device)
    except Exception as e:
        typer.echo(f"ckptdiff: error: cannot join the torchrun process group ({e}); check the launch", err=True)
        raise SystemExit(2) from None
    RANK[0] = world.rank if world is not None else 0
    if RANK[0] != 0:
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
