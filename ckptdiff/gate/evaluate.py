"""Evaluating rules on the analyses' per-tensor frames.

Frames, one per analysis, hold the analyses' per-tensor rows (their CSV columns); every frame has ``tensor``
and ``status`` (:class:`ckptdiff.engine.alignment.Status`: "ok", "dtype_changed", "non_float" were compared; the
others were not and never enter a metric) and the SVD analyses' frames an ``outcome``. A metric rule's scope
figure is the metric's own declaration evaluated over the rows in scope (:mod:`ckptdiff.analyses.scopes`).

A row enters a metric when its status allows and the columns the metric reads are not NA (1-D tensors
without a spectrum may sit in the spectral frame with NaN values). A scope with no such row is an input
error; a measured value that is NaN (a ratio over a scope where nothing changed) fails its rule, since a
gate must not pass on a vacuous measurement; a matrix whose values are not finite fails every SVD rule
whose scope holds it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from ckptdiff.engine.alignment import Outcome, Status
from ckptdiff.errors import InputError, option
from ckptdiff.gate.rules import METRICS, Op, Rule, StructuralRules, unknown_metric

# Statuses as the frames hold them (plain strings).
OK, DTYPE_CHANGED, NON_FLOAT = Status.OK.value, Status.DTYPE_CHANGED.value, Status.NON_FLOAT.value
ONLY_BASE, ONLY_FT, MISSING = Status.ONLY_BASE.value, Status.ONLY_FT.value, Status.MISSING.value
SHAPE_MISMATCH, KIND_MISMATCH = Status.SHAPE_MISMATCH.value, Status.KIND_MISMATCH.value
TIE_CHANGED, SCALE_MISMATCH = Status.TIE_CHANGED.value, Status.SCALE_MISMATCH.value
COMPARABLE = frozenset({OK, DTYPE_CHANGED, NON_FLOAT})
_STATUS_TEXT = {
    ONLY_BASE: "only in base",
    ONLY_FT: "only in fine-tune",
    MISSING: "missing from a fine-tune",
    SHAPE_MISMATCH: "shape changed",
    KIND_MISMATCH: "float on one side only",
    DTYPE_CHANGED: "dtype changed",
    NON_FLOAT: "dtype changed",
    TIE_CHANGED: "tied to another tensor on one side only",
    SCALE_MISMATCH: "fp8 scale on one side only",
}
MAX_OFFENDERS = 5

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": lambda x, y: x < y,
    "<=": lambda x, y: x <= y,
    ">": lambda x, y: x > y,
    ">=": lambda x, y: x >= y,
    "==": lambda x, y: x == y,
    "!=": lambda x, y: x != y,
}


@dataclass(frozen=True)
class Offender:
    """A tensor behind a failing rule, with its value or a short reason."""

    tensor: str
    value: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class RuleResult:
    """One rule's outcome: measured value against the threshold, and the worst tensors when it fails."""

    rule: str  # canonical text, e.g. "sparsity@model.* >= 0.3" or "same_keys"
    kind: Literal["metric", "structural"]
    op: Op
    threshold: float
    value: float  # measured; structural rules measure the number of violating tensors
    passed: bool
    n_tensors: int  # tensors the rule looked at
    offenders: tuple[Offender, ...] = ()  # at most max_offenders, worst first
    n_offenders: int = 0  # all violating tensors (structural) or offenders listed (metric)
    note: str = ""
    counts: str = ""  # structural rules: what the value counts, e.g. "tensors on one side only"


@dataclass(frozen=True)
class CheckResult:
    """All rule outcomes of one check."""

    results: tuple[RuleResult, ...]

    @property
    def passed(self) -> bool:
        """Whether every rule passed."""
        return all(r.passed for r in self.results)


def exit_code(result: CheckResult) -> int:
    """0 when every rule passes, 1 when one fails (bad input raises InputError, exit code 2)."""
    return 0 if result.passed else 1


def _matching(names: pd.Series, glob: str) -> pd.Series:
    return names.map(lambda name: fnmatch.fnmatchcase(str(name), glob)).astype(bool)


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], analysis: str) -> None:
    missing = [c for c in ("tensor", "status", *columns) if c not in frame.columns]
    if missing:
        raise ValueError(f"the {analysis} frame lacks columns {missing}")


def _frame(frames: dict[str, pd.DataFrame], analysis: str) -> pd.DataFrame:
    if analysis not in frames:
        raise ValueError(f"no {analysis} frame given; required_analyses() lists what evaluate needs")
    return frames[analysis]


def _offender_order(values: pd.Series, op: Op, threshold: float) -> pd.Series:
    """A sort key where larger means worse for this comparison."""
    if op in ("<", "<="):
        return values
    if op in (">", ">="):
        return -values
    distance = (values - threshold).abs()
    return distance if op == "==" else -distance


def _undefined(rule: Rule, n_tensors: int, offenders: tuple[Offender, ...], n_offenders: int, note: str) -> RuleResult:
    """A metric rule whose value is undefined in its scope: it fails, and the note says why (never a pass)."""
    return RuleResult(
        rule=str(rule),
        kind="metric",
        op=rule.op,
        threshold=rule.value,
        value=math.nan,
        passed=False,
        n_tensors=n_tensors,
        offenders=offenders,
        n_offenders=n_offenders,
        note=note,
    )


def _evaluate_metric(rule: Rule, frames: dict[str, pd.DataFrame], max_offenders: int) -> RuleResult:
    spec = METRICS.get(rule.metric)
    if spec is None:
        raise InputError(unknown_metric(rule.metric, str(rule)))
    frame = _frame(frames, spec.analysis)
    _require_columns(frame, spec.needs, spec.analysis)
    in_scope = frame if rule.scope is None else frame[_matching(frame["tensor"], rule.scope)]
    if in_scope.empty:
        raise InputError(
            f"scope {rule.scope!r} of rule '{rule}' matches no tensor in the {spec.analysis} analysis: "
            "check the glob against the checkpoint's tensor names"
        )
    outcome = in_scope["outcome"] if "outcome" in in_scope else pd.Series("", index=in_scope.index)
    broken = in_scope[outcome == Outcome.NON_FINITE.value]
    if not broken.empty and spec.analysis != "sparsity":
        # NaN/inf weights leave the metric undefined for those matrices: never a pass by omission.
        listed = tuple(Offender(str(t), None, "non-finite values") for t in broken["tensor"].head(max_offenders))
        note = (
            f"{_matrices(len(broken))} in scope {'holds' if len(broken) == 1 else 'hold'} NaN or inf values, "
            f"so {rule.metric} is undefined for {'it' if len(broken) == 1 else 'them'}"
        )
        return _undefined(rule, len(in_scope), listed, len(broken), note)
    measured = spec.measured(in_scope)
    if measured.empty:
        tensors = "tensor" if len(in_scope) == 1 else "tensors"
        raise InputError(
            f"rule '{rule}' matches {len(in_scope)} {tensors} but none has a {rule.metric} value "
            f"(not compared, or no {spec.analysis} analysis for them): narrow or fix the scope"
        )
    usable, left = spec.rows(measured), spec.left_out(measured)
    if usable.empty:
        # Every value in scope is a number that is not a measurement: say so, and never pass on it.
        listed = tuple(Offender(str(t), None, _flag(r)) for t, r in zip(left["tensor"], _flags(left), strict=True))
        note = f"{rule.metric} is not measured for any of the {_matrices(len(left))} in scope: {spec.undefined_why}"
        return _undefined(rule, len(measured), listed[:max_offenders], len(left), note)
    value = float(spec.aggregate(usable))
    passed = not math.isnan(value) and _COMPARE[rule.op](value, rule.value)
    offenders: tuple[Offender, ...] = ()
    if not passed:
        per_tensor = pd.DataFrame({"tensor": usable["tensor"].astype(str), "value": spec.per_tensor(usable)})
        per_tensor = per_tensor.dropna(subset=["value"])
        per_tensor["key"] = _offender_order(per_tensor["value"], rule.op, rule.value)
        # Tensors that fail the comparison on their own, when any do; else the scope's worst.
        alone = per_tensor[~per_tensor["value"].map(lambda v: _COMPARE[rule.op](v, rule.value))]
        if not alone.empty:
            per_tensor = alone
        worst = per_tensor.sort_values(["key", "tensor"], ascending=[False, True], kind="stable").head(max_offenders)
        offenders = tuple(Offender(t, float(v)) for t, v in zip(worst["tensor"], worst["value"], strict=True))
    note = f"undefined over this scope ({spec.aggregation})" if math.isnan(value) else ""
    if len(left):
        out = f"{len(left)} of {_matrices(len(measured))} in scope left out: {spec.undefined_why}"
        note = "; ".join(n for n in (note, out) if n)
    return RuleResult(
        rule=str(rule),
        kind="metric",
        op=rule.op,
        threshold=rule.value,
        value=value,
        passed=passed,
        n_tensors=len(usable),
        offenders=offenders,
        n_offenders=len(offenders),
        note=note,
    )


def _matrices(n: int) -> str:
    return f"{n} matrix" if n == 1 else f"{n} matrices"


def _flags(rows: pd.DataFrame) -> list[str]:
    return [str(x) for x in rows["angles"]] if "angles" in rows.columns else [""] * len(rows)


def _flag(flag: str) -> str:
    return {"trivial_k": "k = min(m, n)", "unstable_gap": "unstable: small gap"}.get(flag, flag)


# What each structural rule's value counts (the rule's name up to its '@'), said beside the value.
COUNTS = {
    "same_keys": "tensors on one side only",
    "same_shapes": "tensors whose shape changed",
    "same_dtypes": "tensors whose dtype changed",
    "same_param_count": "difference in parameter count",
    "unchanged": "changed tensors",
    "only_changed": "changed tensors outside the globs",
}


def _structural_result(name: str, n_tensors: int, violations: Sequence[Offender], max_offenders: int) -> RuleResult:
    return RuleResult(
        counts=COUNTS[name.split("@")[0]],
        rule=name,
        kind="structural",
        op="==",
        threshold=0.0,
        value=float(len(violations)),
        passed=not violations,
        n_tensors=n_tensors,
        offenders=tuple(violations[:max_offenders]),
        n_offenders=len(violations),
    )


def _details(rows: pd.DataFrame) -> list[Offender]:
    """One offender per row, described by its ``detail`` column when non-empty, else by its status."""
    notes = rows["detail"] if "detail" in rows.columns else pd.Series("", index=rows.index)
    return [
        Offender(str(t), None, _described(s, d)) for t, s, d in zip(rows["tensor"], rows["status"], notes, strict=True)
    ]


def _described(status: str, detail: object) -> str:
    """A row's detail (analyses.base.item_detail: the side of a one-sided name leads it), else its status in words."""
    return detail if isinstance(detail, str) and detail else _STATUS_TEXT.get(status, status)


def _changed_offenders(rows: pd.DataFrame) -> list[Offender]:
    """Rows that changed (changed > 0) or could not be compared, not-compared first, then most changed."""
    changed = rows["changed"].astype("float64")
    compared = rows["status"].isin(COMPARABLE)
    bad = rows.assign(order=changed.where(compared, math.inf))[~compared | (changed > 0)]
    bad = bad.sort_values(["order", "tensor"], ascending=[False, True], kind="stable")
    return [
        Offender(str(t), float(c), "changed") if s in COMPARABLE else Offender(str(t), None, _STATUS_TEXT.get(s, s))
        for t, s, c in zip(bad["tensor"], bad["status"], bad["order"], strict=True)
    ]


def _dtype_changed(frame: pd.DataFrame) -> pd.Series:
    """Rows whose dtype differs: by status, or by differing non-empty dtype columns (integer tensors)."""
    changed = frame["status"].isin([DTYPE_CHANGED, KIND_MISMATCH, SCALE_MISMATCH])
    if "dtype_base" in frame.columns and "dtype_ft" in frame.columns:
        base, ft = frame["dtype_base"].fillna("").astype(str), frame["dtype_ft"].fillna("").astype(str)
        changed |= (base != "") & (ft != "") & (base != ft)
    return changed


def _evaluate_structural(structural: StructuralRules, frame: pd.DataFrame, max_offenders: int) -> list[RuleResult]:
    _require_columns(frame, ("changed",), "sparsity")
    frame = frame.sort_values("tensor", kind="stable")
    n = len(frame)
    results: list[RuleResult] = []
    if structural.same_keys:  # a tie_changed name is not missing: its data is there, as the tensor it is tied to
        found = _details(frame[frame["status"].isin([ONLY_BASE, ONLY_FT, MISSING])])
        results.append(_structural_result("same_keys", n, found, max_offenders))
    if structural.same_shapes:
        found = _details(frame[frame["status"] == SHAPE_MISMATCH])
        results.append(_structural_result("same_shapes", n, found, max_offenders))
    if structural.same_dtypes:
        found = _details(frame[_dtype_changed(frame)])
        results.append(_structural_result("same_dtypes", n, found, max_offenders))
    for glob in structural.expect_unchanged:
        rows = frame[_matching(frame["tensor"], glob)]
        if rows.empty:
            flag = option("--expect-unchanged")
            raise InputError(f"{flag} {glob!r} matches no tensor: check the glob against the tensor names")
        results.append(_structural_result(f"unchanged@{glob}", len(rows), _changed_offenders(rows), max_offenders))
    if structural.allow_changed:
        allowed = pd.Series(False, index=frame.index)
        for glob in structural.allow_changed:
            hit = _matching(frame["tensor"], glob)
            if not hit.any():
                flag = option("--allow-changed")
                raise InputError(f"{flag} {glob!r} matches no tensor: check the glob against the tensor names")
            allowed |= hit
        rows = frame[~allowed]
        name = "only_changed@" + ",".join(structural.allow_changed)
        results.append(_structural_result(name, len(rows), _changed_offenders(rows), max_offenders))
    return results


def evaluate(
    rules: Sequence[Rule],
    frames: dict[str, pd.DataFrame],
    structural: StructuralRules | None = None,
    max_offenders: int = MAX_OFFENDERS,
) -> CheckResult:
    """Evaluate metric rules on per-tensor frames (keyed by analysis) and structural checks on the sparsity frame."""
    results = [_evaluate_metric(rule, frames, max_offenders) for rule in rules]
    if structural is not None and structural.active:
        results.extend(_evaluate_structural(structural, _frame(frames, "sparsity"), max_offenders))
    return CheckResult(results=tuple(results))


def check_scopes(
    rules: Iterable[Rule],
    structural: StructuralRules | None,
    names: Iterable[str],
    tied: Mapping[str, str] | None = None,
) -> None:
    """Fail early (InputError) on a rule or structural glob that matches none of the given tensor names.

    ``tied`` maps names that are another tensor (``ckptdiff.io.views.ties``: a tied ``lm_head.weight``) to the tensor
    they are: a glob that matches only such a name is told which name to use.
    """
    name_list = list(names)
    globs = [(f"rule '{r}'", r.scope) for r in rules if r.scope is not None]
    if structural is not None:
        globs += [(option("--expect-unchanged"), g) for g in structural.expect_unchanged]
        globs += [(option("--allow-changed"), g) for g in structural.allow_changed]
    for where, glob in globs:
        if any(fnmatch.fnmatchcase(n, glob) for n in name_list):
            continue
        aliases = sorted(a for a in (tied or {}) if fnmatch.fnmatchcase(a, glob))
        if aliases:
            to = (tied or {})[aliases[0]]
            raise InputError(
                f"{where}: scope {glob!r} matches only {aliases[0]}, which is tied to {to} (one tensor, compared "
                f"under that name): scope it to {to}"
            )
        raise InputError(f"{where}: scope {glob!r} matches no tensor: check the glob against the tensor names")
