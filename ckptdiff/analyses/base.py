"""What every analysis shares: the :class:`Report` it hands to the renderers, its JSON form, the summary helpers,
rollups computed once, and the leading columns of every per-tensor row."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd
import torch

from ckptdiff.engine.alignment import Aligned
from ckptdiff.errors import InputError
from ckptdiff.io.views import fp8
from ckptdiff.metrics.mask import comparison_dtype
from ckptdiff.naming import expert_of, is_linear, layer_of, module_of

_F = TypeVar("_F", bound=Callable[..., Any])


def once_per_key(method: _F) -> _F:
    """Make a result's rollup method compute once per argument, returning a copy each call.

    Whole-run results are read-only once made (a caller that edits ``rows`` afterwards gets stale rollups), and
    one ``report`` run asks for the same rollup several times (terminal, HTML, Markdown, JSON, figures); on an
    80-layer model each costs a noticeable fraction of a second.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        key = (method.__name__, tuple(bound.arguments.items())[1:])
        cache = self.__dict__.setdefault("_once", {})
        if key not in cache:
            cache[key] = method(self, *args, **kwargs)
        return cache[key].copy()

    return wrapper  # type: ignore[return-value]


def row_basics(item: Aligned) -> dict[str, object]:
    """The leading columns of every per-tensor row: tensor, stack, layer, module, expert, shape, dtypes, numel,
    status.

    A block-scaled FP8 weight's dtype reads ``f8_e4m3/128x128`` (stored codes / block size; its values are
    compared dequantized, in fp32).
    """
    infos = item.infos
    base, ft = infos[0], infos[-1]
    shape_src = base or ft
    shape = tuple(shape_src.shape) if shape_src is not None else ()
    return {
        "tensor": item.name,
        "stack": item.stack,
        "layer": layer_of(item.name),
        "module": module_of(item.name),
        "expert": expert_of(item.name),
        "shape": "x".join(str(d) for d in shape) if shape else "scalar",
        "dtype_base": fp8.label(base) if base is not None else "",
        "dtype_ft": fp8.label(ft) if ft is not None else "",
        "numel": shape_src.numel if shape_src is not None else 0,
        "linear": is_linear(item.name, shape),
        "status": item.status.value,
    }


# A name present on one side only has no detail of its own in alignment: these words say which side, in every
# command's CSV, structural findings and check offenders alike.
ONE_SIDE = {"only_base": "only in base", "only_ft": "only in fine-tune"}
NON_FINITE = "non-finite values (NaN or inf)"  # how every analysis's detail starts for such a tensor


def item_detail(item: Aligned) -> str:
    """The structural note of a tensor: alignment's detail and any FP8 note of its sides (see ckptdiff.io.views.fp8),
    led by the side a one-sided name is on (``only in fine-tune``): one wording across commands."""
    side = ONE_SIDE.get(item.status.value, "")
    return "; ".join(d for d in (side, item.detail, fp8.notes(item.infos)) if d)


def non_finite_detail(where: str = "", consequence: str = "") -> str:
    """The detail of a tensor holding NaN or inf, in every analysis: :data:`NON_FINITE`, then ``in <where>`` and
    what it means for that analysis, e.g. ``non-finite values (NaN or inf) in the base: SVD undefined``."""
    return NON_FINITE + (f" in {where}" if where else "") + (f": {consequence}" if consequence else "")


def pair_target(item: Aligned, as_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a base/fine-tune float pair is compared in (``--as`` wins; see ``comparison_dtype``)."""
    a, b = (i.dtype.torch for i in item.infos if i is not None)
    return comparison_dtype(a, b, as_dtype)


# Machine keys of the usual tables (--rollups-csv's ``key`` column, JSON's ``table_keys``), by title up to its first
# parenthesis; any other title's key is its words joined by underscores.
_KEYS = {"overall": "overall", "per module type": "by_module", "per layer": "by_layer"}


@dataclass
class Table:
    """A titled table for the terminal, Markdown and JSON.

    JSON, Markdown and ``--rollups-csv`` hold the whole frame. The terminal shows its key columns (the index, or
    leading tensor/run columns) and, when ``view`` is given, only the view's columns under the view's short
    headers, explained by ``legend`` (see :mod:`ckptdiff.render.terminal`); ``compact`` when the frame is too wide for
    one table (e.g. a run x run matrix with the runs numbered). ``terminal=False`` leaves the table out of the
    terminal (another table there shows the same figures); ``rollup=False`` leaves it out of ``--rollups-csv``.
    """

    title: str
    frame: pd.DataFrame
    note: str = ""
    view: dict[str, str] | None = None  # column -> terminal header, in order
    legend: str = ""  # what the view's short headers mean
    terminal: bool = True
    compact: pd.DataFrame | None = None  # shown instead when the frame would need more than one terminal table
    rollup: bool = True  # in ``--rollups-csv`` (False: a table of text cells, e.g. the fine-tunes side by side)
    key: str = ""  # machine key in --rollups-csv and JSON; empty: derived from the title (see :meth:`machine_key`)

    def machine_key(self) -> str:
        """``by_module``, ``by_layer``, ``layer_x_module``, ...: ``key``, else derived from the title."""
        if self.key:
            return self.key
        words = self.title.split("(")[0].split(":")[0].strip().lower()
        words = words.removeprefix("sparsity, ")
        return _KEYS.get(words) or "_".join("".join(c if c.isalnum() else " " for c in words).split())


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


def figures_table(scopes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Scope figures side by side: one column per scope (overall, linear layers), one row per figure, index
    ``figure``. Integers stay integers (a column of floats would print one changed entry as ``1.0000``); a figure a
    scope lacks is NaN."""
    keys = list(dict.fromkeys(k for figures in scopes.values() for k in figures))
    columns = {
        name: pd.Series([figures.get(k, math.nan) for k in keys], index=keys, dtype=object)
        for name, figures in scopes.items()
    }
    frame = pd.DataFrame(columns, index=keys)
    frame.index.name = "figure"
    return frame


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


def to_json_dict(report: Report, summary_only: bool = False) -> dict[str, Any]:
    """The report as JSON-safe Python data (see :func:`to_json`); with ``summary_only`` its header and summary."""
    if summary_only:
        return {"title": report.title, "header": report.header, "summary": report.summary}
    return {
        "title": report.title,
        "header": report.header,
        "summary": report.summary,
        "tables": {t.title: records(t.frame.reset_index()) for t in report.tables},
        "table_keys": {t.machine_key(): t.title for t in report.tables},
        "tensors": records(report.tensors),
        "structural": records(report.structural),
        **_clean(report.extra),
    }


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


def findings(frame: pd.DataFrame) -> pd.Series:
    """Which rows of a per-tensor frame are structural findings, the same rule in every command: a structural
    status other than ``ok`` (integer tensors aside: they are compared exactly, or skipped as expected), non-finite
    values (an ``outcome`` of ``non_finite``, or sparsity's ``changed_nonfinite``), or a note in ``detail``."""
    listed = ~frame["status"].isin(["ok", "non_float"]) | (frame["detail"].astype(str) != "")
    listed &= frame["status"] != "non_float"
    if "outcome" in frame:
        listed |= frame["outcome"] == "non_finite"
    return listed


def digest(frame: pd.DataFrame, listed: pd.Series | None, skipped: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """The structural findings worth a row, and one summary line per kind of expected difference.

    ``frame`` has one row per tensor (``tensor``, ``status``, ``detail``, ...), ``listed`` marks the rows the
    analysis reports as structural (None: :func:`findings`, the rule every pairwise analysis shares), ``skipped``
    says why a row was skipped as expected (a key of the skip kinds: not a matrix, integer, empty; '' for none). A
    dtype change shared by at least half of the tensors is one line, not a row per tensor; expected skips are one
    line, counted by kind. What is left (missing tensors, shape or kind mismatches, non-finite values, a dtype
    change of a few tensors) are the rows.
    """
    if listed is None:
        listed = findings(frame)
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


def rollup_key(key: object, keys: Sequence[str]) -> str:
    """``key`` if a result's ``by(key)`` knows it; else an :class:`InputError` listing the keys it knows."""
    if not isinstance(key, str) or key not in keys:
        raise InputError(f"by({key!r}): no such rollup; choose from {', '.join(repr(k) for k in keys)}")
    return key


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 pair``, ``2 pairs``, ``3 matrices`` (with ``plural``)."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
