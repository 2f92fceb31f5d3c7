"""Option types shared by every command, declared once; and the helpers that turn them into library values.

Nothing here imports torch: ``ckptdiff --help`` must stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ckptdiff.analyses.base import Report
    from ckptdiff.io.outputs import OutputSet
    from ckptdiff.metrics.mask import CompareMode


class Fmt(str, Enum):
    """Stdout formats."""

    table = "table"
    csv = "csv"
    json = "json"
    md = "md"


BaseArg = Annotated[
    str,
    typer.Argument(metavar="BASE", help="Base checkpoint: .safetensors/.bin file, folder, or Hub id org/name[@rev]."),
]
FtArg = Annotated[str, typer.Argument(metavar="FT", help="Fine-tuned checkpoint, same forms as BASE.")]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", "-i", help="Glob of full tensor names to keep, e.g. '*mlp*' (repeatable, or a,b)."),
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option("--exclude", "-x", help="Glob of full tensor names to drop (repeatable, or a,b).")
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", help="Where the arithmetic runs (auto: a GPU if any)."),
]
RtolOpt = Annotated[
    float | None,
    typer.Option("--rtol", help="Relative test |d| <= rtol*max(|w0|,|w1|) (PNT uses 1e-3) instead of bitwise."),
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", help="Absolute test |d| <= atol (MUK uses 1e-5) instead of bitwise.")
]
AsOpt = Annotated[
    str | None,
    typer.Option(
        "--as",
        metavar="<bf16|fp16|fp32>",
        show_default="native: no rounding",
        help="Round both sides to this storage dtype first: bf16, fp16 or fp32.",
    ),
]
MergedDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--merged-dtype",
        metavar="<bf16|fp16|fp32>",
        help="A PEFT adapter fine-tune: the dtype its merged weights W + BA would be stored in (bf16, fp16 or "
        "fp32; default: each base weight's dtype). Sparsity of a merged adapter depends on it.",
    ),
]
CsvOpt = Annotated[Path | None, typer.Option("--csv", help="Write per-tensor rows as CSV to this file.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON to this file.")]
RollupsCsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--rollups-csv",
        help="Write every rollup table (overall, per module, per layer, ...) to this CSV, one under the other, "
        "with a leading 'table' column naming each.",
    ),
]
FormatOpt = Annotated[Fmt, typer.Option("--format", "-f", help="Stdout format: table, csv, json or md.")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress on stderr (a bar on a terminal, else a line every few seconds); stdout is unchanged.",
    ),
]
SummaryOpt = Annotated[
    bool,
    typer.Option(
        "--summary",
        "-s",
        help="Print only the header and the summary sentences (table, md or json); output files are complete.",
    ),
]
# What each verbosity prints, for the commands' --help (their epilogs end with it).
VERBOSITY = (
    "Output: stdout gets the header (inputs, settings, versions), the summary sentences, the rollup tables (every "
    "layer) and the structural findings; --summary prints the header and the summary sentences only. Progress "
    "goes to stderr, a bar on a terminal and a plain line every few seconds otherwise (CI logs); --quiet "
    "silences it. Files (--csv, --json, --rollups-csv) always hold everything."
)

# SVD-based analyses (principal-overlap, spectral, report). Values are checked by the library, which answers a bad
# one with a one-line error (exit 2), so library and CLI callers get the same wording.
KOpt = Annotated[int, typer.Option("--k", help="Top-k singular directions per matrix (capped at min(m, n)).")]
AlphaOpt = Annotated[
    float, typer.Option("--alpha", help="Mask density in (0, 1): principal = top α, low = bottom α of the entries.")
]
SvdOpt = Annotated[
    str,
    typer.Option(
        "--svd",
        metavar="<exact|randomized|auto>",
        help="exact (torch.linalg.svd), randomized (svd_lowrank) or auto (by shape).",
    ),
]
NullOpt = Annotated[
    str,
    typer.Option(
        "--null",
        metavar="<none|random>",
        help="none, or random: also score W0 + a Gaussian update of the same Frobenius norm.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random null (per matrix: seed and tensor name).")]
NullDrawsOpt = Annotated[
    int,
    typer.Option(
        "--null-draws",
        metavar="N",
        help="Draw the random null N times (seeds --seed to --seed + N - 1, one more SVD per matrix each); the "
        "verdict says in how many draws it holds.",
    ),
]
# report and check run both SVD analyses: --precision is principal-overlap's, --spectral-precision spectral's.
PrincipalPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        metavar="<fp32|fp64>",
        help="principal-overlap SVD dtype: fp32 or fp64 (as in principal-overlap).",
    ),
]
SpectralPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--spectral-precision", metavar="<fp64|fp32>", help="spectral SVD dtype: fp64 or fp32 (as in spectral)."
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--batch-budget",
        help="GiB one batch of same-shape matrices may use (default: half the free GPU memory, 2 on CPU).",
    ),
]
FtsArg = Annotated[
    list[str],
    typer.Argument(metavar="FT", help="Fine-tuned checkpoints of BASE (same forms as BASE).", show_default=False),
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        "-l",
        help="Name for each fine-tune, in order (repeat once per fine-tune). Default: derived from the paths.",
    ),
]


def compare_mode(rtol: float | None, atol: float | None, as_: str | None) -> CompareMode:
    """Build the comparison mode from --rtol/--atol/--as, rejecting contradictory values."""
    from ckptdiff.metrics.mask import compare_mode as build

    return build(rtol=rtol, atol=atol, as_dtype=as_)


def inputs_exist(specs: Sequence[str | Path]) -> None:
    """Each checkpoint given is a usable path or a Hub id (:func:`ckptdiff.io.layout.check_spec`), checked before
    torch or pandas load: a mistyped path fails about as fast as ``--help``, with the nearest name."""
    from ckptdiff.io.layout import check_spec

    for spec in specs:
        check_spec(str(spec))


def outputs(
    inputs: Sequence[str | Path | None], files: dict[str, Path | None], *, side_files: Sequence[Path] = ()
) -> OutputSet:
    """The run's output files by option (``{"--csv": path, ...}``), checked against the inputs and each other
    before any checkpoint is read (see :mod:`ckptdiff.io.outputs`), after the checkpoints ``inputs`` are checked
    (:func:`inputs_exist`). ``side_files`` (a rules file) are inputs no output may replace. Nothing heavy is
    imported here: call it before the analyses load. Use the result as a context manager."""
    from ckptdiff.io.outputs import OutputSet

    inputs_exist([i for i in inputs if i is not None])
    outs = OutputSet([*(i for i in inputs if i is not None), *side_files])
    for flag, path in files.items():
        outs.add(flag, path)
    return outs


@contextmanager
def stdout_may_close() -> Iterator[None]:
    """A reader that stops reading (``ckptdiff ... | head -3``) is not an error: printing stops quietly, with no
    traceback, and the command keeps its own exit status (0, or check's 1, so a gate piped into ``head`` still
    fails); output files are already in place by then."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # later flushes, including the interpreter's at exit, go nowhere instead of failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def check_summary(fmt: Fmt, summary: bool) -> None:
    """--summary has no CSV form: refuse the pair before any work."""
    if summary and fmt is Fmt.csv:
        from ckptdiff.errors import InputError

        raise InputError("--summary has no CSV form; use --format table, md or json (--csv writes the rows)")


def emit(report: Report, fmt: Fmt, outs: OutputSet, summary: bool = False) -> None:
    """Write the report to the set's --csv/--json/--rollups-csv, put every output file in place together, then print
    to stdout (only the header and the summary with ``summary``)."""
    from ckptdiff.render.terminal import print_summary, print_tables
    from ckptdiff.render.text import render, to_csv, to_json, to_rollups_csv

    text = render(report, fmt.value, summary)
    for flag, content in (("--csv", to_csv), ("--json", to_json), ("--rollups-csv", to_rollups_csv)):
        out = outs.get(flag)
        if out is not None:
            out.write(content(report))
    outs.commit()
    with stdout_may_close():
        if text is not None:
            typer.echo(text, nl=False)
        elif summary:
            print_summary(report)
        else:
            print_tables(report)


AsStoredOpt = Annotated[
    bool,
    typer.Option(
        "--as-stored",
        help="Compare quantized checkpoints (MXFP4, GPTQ, AWQ, bitsandbytes, compressed-tensors, FP8) as stored: "
        "raw codes and scales, nothing dequantized; every such row and the header say so. By default their "
        "weights are compared as dequantized values (see 'Quantized formats' in the docs).",
    ),
]


def with_as_stored(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the ``--as-stored`` option added: the run inside it opens checkpoints as stored
    (:func:`ckptdiff.io.views.quant.as_stored`). Declared once here for every command."""
    import functools
    import inspect

    sig = inspect.signature(command, eval_str=True)  # typer reads the options from the annotations
    if "as_stored" in sig.parameters:
        return command

    @functools.wraps(command)
    def run(*args: object, as_stored: bool = False, **kwargs: object) -> None:
        if not as_stored:
            command(*args, **kwargs)
            return
        from ckptdiff.io.views.quant import as_stored as stored  # torch loads only once a command runs

        with stored(True):
            command(*args, **kwargs)

    param = inspect.Parameter("as_stored", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=AsStoredOpt)
    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), param])  # type: ignore[attr-defined]
    run.__annotations__ = {**getattr(command, "__annotations__", {}), "as_stored": AsStoredOpt}
    return run
