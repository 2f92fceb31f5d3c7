"""Reports: one structure every analysis fills, rendered as rich tables, CSV, JSON or Markdown.

Files are written atomically through :mod:`ckptdiff.io.outputs` (temporary file beside the target, then rename), so
a failed or interrupted run never leaves a partial output file. CSV floats are written so that they read back
exactly (shortest round-trip repr): a tensor with 5 of 16,777,216 entries changed does not show sparsity 1.
"""

from __future__ import annotations

import errno
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ckptdiff.errors import InputError

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Table:
    """A titled table for the terminal, Markdown and JSON.

    JSON, Markdown and ``--rollups-csv`` hold the whole frame. The terminal shows its key columns (the index, or
    leading tensor/run columns) and, when ``view`` is given, only the view's columns under the view's short
    headers, explained by ``legend`` (see :mod:`ckptdiff.render.terminal`); ``compact`` when the frame is too wide for
    one table (e.g. a run x run matrix with the runs numbered). ``terminal=False`` leaves the table out of the
    terminal (another table there shows the same figures).
    """

    title: str
    frame: pd.DataFrame
    note: str = ""
    view: dict[str, str] | None = None  # column -> terminal header, in order
    legend: str = ""  # what the view's short headers mean
    terminal: bool = True
    compact: pd.DataFrame | None = None  # shown instead when the frame would need more than one terminal table


@dataclass
class Report:
    """What an analysis hands to the renderers."""

    title: str
    header: dict[str, str]
    summary: list[str]  # plain sentences, the first thing a reader sees
    tables: list[Table]
    tensors: pd.DataFrame  # per-tensor rows: the CSV
    structural: pd.DataFrame = field(default_factory=pd.DataFrame)  # tensors not compared, and why
    extra: dict[str, Any] = field(default_factory=dict)  # further JSON-only content


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN/inf -> None, numpy types -> Python."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts."""
    return [_clean(r) for r in frame.to_dict(orient="records")]


def to_json(report: Report) -> str:
    """The whole report as JSON: header, summary, tables, per-tensor rows, structural findings."""
    return json.dumps(to_json_dict(report), indent=2, allow_nan=False) + "\n"


def to_json_dict(report: Report, summary_only: bool = False) -> dict[str, Any]:
    """The report as JSON-safe Python data (see :func:`to_json`); with ``summary_only`` its header and summary."""
    if summary_only:
        return {"title": report.title, "header": report.header, "summary": report.summary}
    return {
        "title": report.title,
        "header": report.header,
        "summary": report.summary,
        "tables": {t.title: records(t.frame.reset_index()) for t in report.tables},
        "tensors": records(report.tensors),
        "structural": records(report.structural),
        **_clean(report.extra),
    }


def to_csv(report: Report) -> str:
    """Per-tensor rows as CSV, every float written so that it reads back exactly (``float(cell) == value``).

    pandas writes float64 as the shortest repr that round-trips; narrower floats are widened first, so a cell
    holds the value itself rather than the shortest float32 spelling of it.
    """
    frame = report.tensors
    narrow = {c: "float64" for c in frame.columns if str(frame[c].dtype) in ("float16", "float32", "Float32")}
    return str(frame.astype(narrow).to_csv(index=False))


def rollup_frame(report: Report) -> pd.DataFrame:
    """Every table of the report, one under the other, with a leading ``table`` column naming each (the union of
    their columns; a cell a table does not have is empty)."""
    frames = []
    for t in report.tables:
        if t.frame.empty:
            continue
        named = t.frame.index.name is not None or any(n is not None for n in t.frame.index.names)
        flat = t.frame.reset_index() if named else t.frame.copy()
        flat.columns = [str(c) for c in flat.columns]
        flat.insert(0, "table", t.title)
        frames.append(flat)
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(columns=["table"])


def to_rollups_csv(report: Report) -> str:
    """The report's rollup tables as one CSV (see :func:`rollup_frame`), floats written to read back exactly."""
    frame = rollup_frame(report)
    narrow = {c: "float64" for c in frame.columns if str(frame[c].dtype) in ("float16", "float32", "Float32")}
    return str(frame.astype(narrow).to_csv(index=False))


_SKIPS = {
    "matrix": ("tensor that is not a matrix", "tensors that are not matrices (not 2-D)"),
    "integer": ("integer/bool tensor", "integer/bool tensors"),
    "empty": ("empty matrix", "empty matrices"),
}
COMPARED = ("ok", "dtype_changed", "non_float")


def expected_skips(frame: pd.DataFrame) -> pd.Series:
    """Per row of an SVD analysis's frame, why it was not analysed though nothing is wrong with it: ``matrix``
    (not 2-D), ``integer`` or ``empty``; '' for rows analysed, non-finite or structurally mismatched."""
    skipped = frame["status"].isin(COMPARED) & (frame["outcome"] == "not_analysed")
    dims = frame["shape"].astype(str).map(lambda s: 0 if s == "scalar" else s.count("x") + 1)
    kind = pd.Series("empty", index=frame.index)
    kind[dims != 2] = "matrix"
    kind[frame["status"] == "non_float"] = "integer"
    return kind.where(skipped, "")


def digest(frame: pd.DataFrame, listed: pd.Series, skipped: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """The structural findings worth a row, and one summary line per kind of expected difference.

    ``frame`` has one row per tensor (``tensor``, ``status``, ``detail``, ...), ``listed`` marks the rows the
    analysis reports as structural, ``skipped`` says why a row was skipped as expected (a key of the skip kinds:
    not a matrix, integer, empty; '' for none). A dtype change shared by at least half of the tensors is one
    line, not a row per tensor; expected skips are one line, counted by kind. What is left (missing tensors,
    shape or kind mismatches, non-finite values, a dtype change of a few tensors) are the rows.
    """
    lines = []
    changed = frame["status"] == "dtype_changed"
    patterns = frame.loc[changed, "detail"].astype(str).value_counts()
    overall = pd.Series(False, index=frame.index)
    if len(patterns) and 2 * int(patterns.iloc[0]) >= len(frame):
        what = str(patterns.index[0])
        overall = changed & (frame["detail"].astype(str) == what)
        n = int(overall.sum())
        who = "Every tensor" if n == len(frame) else f"{n:,} of {len(frame):,} tensors"
        lines.append(
            f"{who} changed dtype ({what}); each pair is compared after rounding both sides to a common dtype "
            "(the compared_as column)."
        )
    skip = skipped.astype(str) != ""
    if skip.any():
        kinds = skipped[skip].value_counts()
        parts = [count(int(n), *_SKIPS[str(kind)]) for kind, n in kinds.items()]
        lines.append("Not analysed, as expected: " + "; ".join(parts) + ".")
    return frame[listed & ~skip & ~overall], lines


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 pair``, ``2 pairs``, ``3 matrices`` (with ``plural``)."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"


def cell(value: Any) -> str:
    """One value as the tables show it (integers with separators, 4 decimals, 3 significant digits when tiny)."""
    return _fmt(value)


def _fmt(value: Any) -> str:
    if value is None or value is pd.NA:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and (abs(value) >= 10 or value == 0):
            return f"{int(value):,}"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    named = frame.index.name is not None or any(n is not None for n in frame.index.names)
    flat = frame.reset_index() if named else frame
    cols = [str(c) for c in flat.columns]
    return cols, [[_fmt(v.item() if hasattr(v, "item") else v) for v in row] for row in flat.itertuples(index=False)]


MAX_FINDINGS = 60  # structural findings listed in the terminal and Markdown; all of them are in JSON and CSV
FINDINGS_VIEW = {"tensor": "tensor", "status": "status", "detail": "detail"}


def _findings(report: Report) -> Table:
    return Table("Structural findings", report.structural, view=FINDINGS_VIEW)


def to_markdown(report: Report, summary_only: bool = False) -> str:
    """The report as Markdown (for CI step summaries and papers' appendices): every row of every table (the
    structural findings up to :data:`MAX_FINDINGS`), each summary sentence its own paragraph."""
    lines = [f"## {report.title}", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in report.header.items()]
    for s in report.summary:
        lines += ["", f"> {s}"]
    if summary_only:
        return "\n".join(lines) + "\n"
    for table in [*report.tables, _findings(report)]:
        if table.frame.empty:
            continue
        cols, rows = _rows(table.frame)
        limit = MAX_FINDINGS if table.title == "Structural findings" else len(rows)
        lines += ["", f"### {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(r) + " |" for r in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"\n({len(rows) - limit} more rows in the CSV/JSON output)")
    return "\n".join(lines) + "\n"


def print_summary(report: Report, console: Console | None = None) -> None:
    """The header and the summary sentences (``--summary``), with rich on stdout."""
    from rich.table import Table as RichTable
    from rich.text import Text

    console = console or stdout_console()
    head = RichTable(title=report.title, show_header=False, title_justify="left", box=None)
    head.add_column(style="dim", no_wrap=True)
    head.add_column(overflow="fold")  # long paths wrap; nothing is cut
    for k, v in report.header.items():
        head.add_row(k, v)
    console.print(head)
    for s in report.summary:
        console.print(Text(s, style="bold"))


def print_tables(report: Report, console: Console | None = None) -> None:
    """Render the report with rich on stdout: header, summary, every table's terminal view, structural findings.

    Tables fit the console's width without cutting a cell (see :mod:`ckptdiff.render.terminal`).
    """
    from ckptdiff.render.terminal import rich_tables

    console = console or stdout_console()
    print_summary(report, console)
    legends: set[str] = set()
    for table in [*report.tables, _findings(report)]:
        if table.frame.empty or not table.terminal:
            continue
        if table.legend in legends:  # said once, under the first table with these headers
            table = replace(table, legend="")
        legends.add(table.legend)
        limit = MAX_FINDINGS if table.title == "Structural findings" else None
        for rt in rich_tables(table, console.width, limit):
            console.print(rt)


def render(report: Report, fmt: str, summary_only: bool = False) -> str | None:
    """Text for --format csv|json|md; None for 'table' (printed with rich instead). ``summary_only``: the header
    and summary sentences only (``--summary``; CSV has no such form)."""
    if fmt == "table":
        return None
    if fmt == "csv":
        if summary_only:
            raise InputError("--summary has no CSV form; use --format table, md or json (--csv writes the rows)")
        return to_csv(report)
    if fmt == "json":
        return json.dumps(to_json_dict(report, summary_only), indent=2, allow_nan=False) + "\n"
    if fmt == "md":
        return to_markdown(report, summary_only)
    raise InputError(f"--format {fmt} is not known; use table, csv, json or md")


def stdout_console() -> Console:
    """A rich console on stdout that raises BrokenPipeError when the reader has gone (``| head``).

    rich's default exits with status 1 instead; the CLI treats a closed stdout as the reader's choice and keeps
    the command's own exit status.
    """
    from rich.console import Console

    class _StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, "stdout was closed")

    return _StdoutConsole()


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to path via a temporary file beside it and an atomic rename: never a partial file.

    The checks and rules of :class:`ckptdiff.io.outputs.OutputSet` apply (a symlink is written through, mode
    0666 & ~umask, a non-regular destination is refused, write errors are one-line InputErrors).
    """
    from ckptdiff.io.outputs import standalone

    out = standalone(path, "output")
    assert out is not None
    try:
        out.write(text)
    finally:
        out.discard()  # nothing left to remove once renamed


def check_writable(*paths: str | Path | None) -> None:
    """Fail before any work if an output file cannot be created (nothing is written either way)."""
    from ckptdiff.io.outputs import OutputSet

    outs = OutputSet()
    for p in paths:
        outs.add("output", p)
