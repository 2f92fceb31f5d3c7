"""A :class:`~ckptdiff.analyses.base.Report` as text: CSV, JSON and Markdown (the terminal's tables are
:mod:`ckptdiff.render.terminal`'s).

The CLI writes these texts through :mod:`ckptdiff.io.outputs` (a temporary file beside the target, then a rename), so
a failed or interrupted run never leaves a partial output file. CSV floats are written so that they read back
exactly (shortest round-trip repr): a tensor with 5 of 16,777,216 entries changed does not show sparsity 1.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from ckptdiff.analyses.base import Report, Table, to_json_dict
from ckptdiff.errors import InputError

if TYPE_CHECKING:
    pass


def to_json(report: Report) -> str:
    """The whole report as JSON: header, summary, tables, per-tensor rows, structural findings."""
    return json.dumps(to_json_dict(report), indent=2, allow_nan=False) + "\n"


def to_csv(report: Report) -> str:
    """Per-tensor rows as CSV, every float written so that it reads back exactly (``float(cell) == value``).

    pandas writes float64 as the shortest repr that round-trips; narrower floats are widened first, so a cell
    holds the value itself rather than the shortest float32 spelling of it.
    """
    frame = report.tensors
    narrow = {c: "float64" for c in frame.columns if str(frame[c].dtype) in ("float16", "float32", "Float32")}
    return str(frame.astype(narrow).to_csv(index=False))


def rollup_frame(report: Report) -> pd.DataFrame:
    """Every rollup table of the report (``Table.rollup``), one under the other, with leading ``table`` (its title)
    and ``key`` (its machine key, e.g. ``by_module``) columns (the union of their columns; a cell a table does not
    have is empty; integer columns stay integers)."""
    frames = []
    for t in report.tables:
        if t.frame.empty or not t.rollup:
            continue
        named = t.frame.index.name is not None or any(n is not None for n in t.frame.index.names)
        flat = t.frame.reset_index() if named else t.frame.copy()
        flat.columns = [str(c) for c in flat.columns]
        types = pd.api.types
        ints = [c for c in flat.columns if types.is_integer_dtype(flat[c]) and not types.is_bool_dtype(flat[c])]
        flat = flat.astype({c: "Int64" for c in ints})  # a cell another table lacks is <NA>, not a float NaN
        flat.insert(0, "table", t.title)
        flat.insert(1, "key", t.machine_key())
        frames.append(flat)
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(columns=["table"])


def to_rollups_csv(report: Report) -> str:
    """The report's rollup tables as one CSV (see :func:`rollup_frame`), floats written to read back exactly."""
    frame = rollup_frame(report)
    narrow = {c: "float64" for c in frame.columns if str(frame[c].dtype) in ("float16", "float32", "Float32")}
    return str(frame.astype(narrow).to_csv(index=False))


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


def findings(report: Report) -> Table:
    """The structural findings as a table (tensor, status, detail)."""
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
    for table in [*report.tables, findings(report)]:
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
