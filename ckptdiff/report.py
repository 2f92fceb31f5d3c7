"""Reports: one structure every analysis fills, rendered as rich tables, CSV, JSON or Markdown.

Files are written atomically through :mod:`ckptdiff.outputs` (temporary file beside the target, then rename), so
a failed or interrupted run never leaves a partial output file. CSV floats are written so that they read back
exactly (shortest round-trip repr): a tensor with 5 of 16,777,216 entries changed does not show sparsity 1.
"""

from __future__ import annotations

import errno
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ckptdiff.errors import InputError

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Table:
    """A titled table for the terminal, Markdown and JSON."""

    title: str
    frame: pd.DataFrame
    note: str = ""


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


def to_json_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-safe Python data (see :func:`to_json`)."""
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


def to_markdown(report: Report, max_rows: int = 60) -> str:
    """The report as Markdown (for CI step summaries and papers' appendices)."""
    lines = [f"## {report.title}", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in report.header.items()]
    lines.append("")
    lines += [f"> {s}" for s in report.summary]
    for table in [*report.tables, Table("Structural findings", report.structural)]:
        if table.frame.empty:
            continue
        cols, rows = _rows(table.frame)
        lines += ["", f"### {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(r) + " |" for r in rows[:max_rows]]
        if len(rows) > max_rows:
            lines.append(f"\n({len(rows) - max_rows} more rows in the CSV/JSON output)")
    return "\n".join(lines) + "\n"


def print_tables(report: Report, max_rows: int = 40) -> None:
    """Render the report with rich on stdout."""
    from rich.table import Table as RichTable

    console = stdout_console()
    head = RichTable(title=report.title, show_header=False, title_justify="left", box=None)
    for k, v in report.header.items():
        head.add_row(f"[dim]{k}[/dim]", v)
    console.print(head)
    for s in report.summary:
        console.print(f"[bold]{s}[/bold]")
    for table in [*report.tables, Table("Structural findings", report.structural)]:
        if table.frame.empty:
            continue
        cols, rows = _rows(table.frame)
        rt = RichTable(title=table.title, title_justify="left", caption=table.note or None, caption_justify="left")
        for c in cols:
            rt.add_column(c, justify="left" if c in ("tensor", "module", "status", "detail", "shape") else "right")
        for r in rows[:max_rows]:
            rt.add_row(*r)
        if len(rows) > max_rows:
            rt.caption = (rt.caption or "") + f" ({len(rows) - max_rows} more rows in --csv/--json)"
        console.print(rt)


def render(report: Report, fmt: str) -> str | None:
    """Text for --format csv|json|md; None for 'table' (printed with rich instead)."""
    if fmt == "table":
        return None
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return to_json(report)
    if fmt == "md":
        return to_markdown(report)
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

    The checks and rules of :class:`ckptdiff.outputs.OutputSet` apply (a symlink is written through, mode
    0666 & ~umask, a non-regular destination is refused, write errors are one-line InputErrors).
    """
    from ckptdiff.outputs import standalone

    out = standalone(path, "output")
    assert out is not None
    try:
        out.write(text)
    finally:
        out.discard()  # nothing left to remove once renamed


def check_writable(*paths: str | Path | None) -> None:
    """Fail before any work if an output file cannot be created (nothing is written either way)."""
    from ckptdiff.outputs import OutputSet

    outs = OutputSet()
    for p in paths:
        outs.add("output", p)
