"""Rule outcomes as a JSON-ready dict and as Markdown."""

from __future__ import annotations

import math
from typing import Any

from ckptdiff.gate.evaluate import CheckResult, exit_code
from ckptdiff.gate.rules import exact_number


def format_value(value: float | None) -> str:
    """A measured value for tables: integers without decimals, others with 6 significant digits, NaN as n/a."""
    if value is None or math.isnan(value):
        return "n/a"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def to_dict(result: CheckResult) -> dict[str, Any]:
    """A JSON-ready plain dict (NaN becomes None)."""
    return {
        "passed": result.passed,
        "exit_code": exit_code(result),
        "rules": [
            {
                "rule": r.rule,
                "kind": r.kind,
                "counts": r.counts,
                "op": r.op,
                "threshold": r.threshold,
                "value": _finite_or_none(r.value),
                "passed": r.passed,
                "n_tensors": r.n_tensors,
                "n_offenders": r.n_offenders,
                "offenders": [
                    {"tensor": o.tensor, "value": _finite_or_none(o.value), "detail": o.detail} for o in r.offenders
                ],
                "note": r.note,
            }
            for r in result.results
        ],
    }


def _md(text: str) -> str:
    """Inline code for Markdown tables (pipes escaped)."""
    return "`" + text.replace("|", "\\|") + "`"


def to_markdown(result: CheckResult) -> str:
    """A Markdown summary: one table row per rule, then the worst tensors of each failing rule."""
    n_pass = sum(r.passed for r in result.results)
    verdict = "PASS" if result.passed else "FAIL"
    lines = [
        f"## ckptdiff check: {verdict} ({n_pass}/{len(result.results)} rules pass)",
        "",
        "| rule | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for r in result.results:
        outcome = "PASS" if r.passed else "FAIL"
        value = format_value(r.value) + (f" ({r.counts})" if r.counts else "")
        lines.append(f"| {_md(r.rule)} | {value} | {r.op} {exact_number(r.threshold)} | {outcome} |")
    for r in result.results:
        if r.passed or not r.offenders:
            continue
        more = f" ({r.n_offenders} in all)" if r.n_offenders > len(r.offenders) else ""
        lines += ["", f"**{_md(r.rule)}** worst tensors{more}:", ""]
        for o in r.offenders:
            parts = [p for p in (format_value(o.value) if o.value is not None else "", o.detail) if p]
            lines.append(f"- {_md(o.tensor)}: {' '.join(parts)}" if parts else f"- {_md(o.tensor)}")
    for r in result.results:
        if r.note:
            lines += ["", f"Note on {_md(r.rule)}: {r.note}."]
    return "\n".join(lines) + "\n"
