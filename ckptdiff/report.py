"""Reports: one structure every analysis fills, rendered as rich tables, CSV, JSON or Markdown.

Files are written atomically (temporary file in the same folder, then rename), so a failed or interrupted
run never leaves a partial output file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ckptdiff.errors import InputError


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
    """Per-tensor rows as CSV."""
    return str(report.tensors.to_csv(index=False, float_format="%.6g"))


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
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
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


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to path via a temporary file and an atomic rename: never a partial file."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {target}: folder {folder} does not exist; create it or pick another path")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(*paths: str | Path | None) -> None:
    """Fail before any work if an output file's folder is missing (nothing is written either way)."""
    for p in paths:
        if p is None:
            continue
        target = Path(p)
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            raise InputError(f"cannot write {target}: folder {folder} does not exist; create it or pick another path")
        if target.is_dir():
            raise InputError(f"cannot write {target}: it is a directory; give a file name")
