"""Rules for ``ckptdiff check``: parsing, the metric registry, TOML config, evaluation and rendering.

A metric rule reads ``METRIC[@GLOB] OP VALUE`` (``sparsity@model.layers.*.mlp.* >= 0.3``); the glob is
matched with ``fnmatch.fnmatchcase`` against full tensor names (``*`` also crosses dots). Structural rules
(``StructuralRules``) check the key set, shapes, dtypes and which tensors may change.

Per-tensor frames, one per analysis, are what ``evaluate`` reads; column names follow the analyses' rows
(``analyses.common.row_basics`` plus ``PrincipalResult`` / ``SpectralResult`` fields). Every frame has
``tensor`` and ``status`` (``ckptdiff.stream``: "ok", "dtype_changed", "non_float" were compared; "only_base",
"only_ft", "missing", "shape_mismatch", "kind_mismatch" were not and never enter a metric). Columns read:

- ``sparsity``: ``numel``, ``changed``; structural messages use ``detail``, ``dtype_base``, ``dtype_ft`` when present.
  sparsity and density are over compared float tensors ("ok", "dtype_changed"), as the sparsity report's
  figures are; changed also counts "non_float" tensors (an integer buffer that changed did change).
- ``principal``: ``changed``, ``numel``, ``principal_size`` / ``low_size`` / ``principal_not_low_size`` (|M•|),
  ``changed_principal`` / ``changed_low`` / ``changed_principal_not_low`` (|M• ∩ M|),
  ``baseline_principal_magnitude`` / ``baseline_low_magnitude`` (magnitude-matched expected overlaps, §2b;
  NaN allowed where changed == 0), ``energy_principal`` and ``delta_fro_sq`` (E_k and ‖ΔW‖_F²).
- ``spectral``: the column of the same name as the metric (``nss``, ``angle_u_max_deg``, ...).

A row enters a metric when its status allows and the columns the metric reads are not NA (1-D tensors
without a spectrum may sit in the spectral frame with NaN values). A scope with no such row is an input
error; a measured value that is NaN (a ratio over a scope where nothing changed) fails its rule, since a
gate must not pass on a vacuous measurement.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ckptdiff.alignment import Outcome, Status
from ckptdiff.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

Op = Literal["<", "<=", ">", ">=", "==", "!="]
Analysis = Literal["sparsity", "principal", "spectral"]

RULE_FORM = "METRIC[@GLOB] OP VALUE, e.g. 'sparsity@model.layers.*.mlp.* >= 0.3'"
# Statuses as the frames hold them (plain strings).
OK, DTYPE_CHANGED, NON_FLOAT = Status.OK.value, Status.DTYPE_CHANGED.value, Status.NON_FLOAT.value
ONLY_BASE, ONLY_FT, MISSING = Status.ONLY_BASE.value, Status.ONLY_FT.value, Status.MISSING.value
SHAPE_MISMATCH, KIND_MISMATCH = Status.SHAPE_MISMATCH.value, Status.KIND_MISMATCH.value
COMPARABLE = frozenset({OK, DTYPE_CHANGED, NON_FLOAT})
FLOAT_COMPARED = frozenset({OK, DTYPE_CHANGED})
_STATUS_TEXT = {
    ONLY_BASE: "only in base",
    ONLY_FT: "only in fine-tune",
    MISSING: "missing from a fine-tune",
    SHAPE_MISMATCH: "shape changed",
    KIND_MISMATCH: "float on one side only",
    DTYPE_CHANGED: "dtype changed",
    NON_FLOAT: "dtype changed",
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

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RULE_RE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_]\w*)\s*"
    r"(?:@\s*(?P<scope>[^\s<>=]+))?\s*"  # a glob: no spaces or comparison characters ('!' allowed for [!x])
    r"(?P<op><=|>=|==|!=|<|>)\s*"
    rf"(?P<value>{_NUMBER})\s*$"
)


# ---------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """One metric rule: METRIC[@SCOPE] OP VALUE; scope None means every tensor."""

    metric: str
    scope: str | None
    op: Op
    value: float

    def __str__(self) -> str:
        """The rule in canonical form."""
        scope = f"@{self.scope}" if self.scope is not None else ""
        return f"{self.metric}{scope} {self.op} {exact_number(self.value)}"


def exact_number(value: float) -> str:
    """A threshold as written back: integers without '.0', others in Python's shortest round-trip form."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)


def parse_rule(text: str, origin: str = "--rule") -> Rule:
    """Parse 'METRIC[@GLOB] OP VALUE' (whitespace tolerant, scientific notation allowed) into a Rule."""
    match = _RULE_RE.match(text)
    if match is None:
        raise InputError(f"cannot parse rule {text!r} from {origin}: expected {RULE_FORM}")
    metric = match["metric"]
    if metric not in METRICS:
        raise InputError(_unknown_metric(metric, text))
    op: Op = match["op"]  # type: ignore[assignment]  # the regex admits only the six operators
    return Rule(metric=metric, scope=match["scope"], op=op, value=float(match["value"]))


def _unknown_metric(metric: str, text: str) -> str:
    return f"unknown metric {metric!r} in rule {text!r}: use one of {', '.join(sorted(METRICS))}"


@dataclass(frozen=True)
class StructuralRules:
    """Structural checks; all are off unless asked for. Globs use fnmatch on full tensor names."""

    same_keys: bool = False  # both checkpoints hold the same tensor names
    same_shapes: bool = False  # no tensor changed shape
    same_dtypes: bool = False  # no tensor changed dtype
    expect_unchanged: tuple[str, ...] = ()  # tensors matching any of these must have changed == 0
    allow_changed: tuple[str, ...] = ()  # when given, every tensor outside them must have changed == 0

    @property
    def active(self) -> bool:
        """Whether any structural check is requested."""
        checks = (self.same_keys, self.same_shapes, self.same_dtypes, self.expect_unchanged, self.allow_changed)
        return any(bool(c) for c in checks)


# ---------------------------------------------------------------------------------------------
# Metric registry


def _sum(frame: pd.DataFrame, column: str) -> float:
    return float(frame[column].astype("float64").sum())


def _div(num: float, den: float) -> float:
    return num / den if den else math.nan


def _col(column: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda f: f[column].astype("float64")


def _safe_div(num: pd.Series, den: pd.Series) -> pd.Series:
    return num.astype("float64") / den.astype("float64").where(den != 0)


def _max(column: str) -> Callable[[pd.DataFrame], float]:
    return lambda f: float(f[column].astype("float64").max())


def _random_expected(frame: pd.DataFrame, region: str) -> pd.Series:
    """Per-tensor expected |region ∩ update| if changes fell at random: changed * |region| / numel."""
    return frame["changed"].astype("float64") * _safe_div(frame[region], frame["numel"])


def _magnitude_expected(frame: pd.DataFrame, baseline: str) -> pd.Series:
    """Per-tensor magnitude-matched expected intersection: baseline overlap * changed (0 where nothing changed)."""
    changed = frame["changed"].astype("float64")
    return (frame[baseline].astype("float64") * changed).where(changed != 0, 0.0)


@dataclass(frozen=True)
class MetricSpec:
    """A metric a rule can name: which analysis produces it, what it reads and how a scope aggregates it."""

    name: str
    analysis: Analysis
    column: str  # the per-tensor column of that analysis's frame (or, for derived metrics, its name there)
    needs: tuple[str, ...]  # columns read; a row with NaN in any of them is left out
    statuses: frozenset[str]  # row statuses that enter the metric
    aggregation: str  # one line: how a scope of tensors becomes one number
    per_tensor: Callable[[pd.DataFrame], pd.Series]
    aggregate: Callable[[pd.DataFrame], float]


def _overlap_spec(name: str, count: str) -> MetricSpec:
    return MetricSpec(
        name=name,
        analysis="principal",
        column=name,
        needs=("changed", count),
        statuses=COMPARABLE,
        aggregation=f"Σ{count} / Σchanged (weighted by updated entries)",
        per_tensor=lambda f: _safe_div(f[count], f["changed"]),
        aggregate=lambda f: _div(_sum(f, count), _sum(f, "changed")),
    )


def _ratio_spec(name: str, count: str, region: str) -> MetricSpec:
    return MetricSpec(
        name=name,
        analysis="principal",
        column=name,
        needs=("changed", "numel", region, count),
        statuses=COMPARABLE,
        aggregation=f"Σ{count} / Σ(changed·{region}/numel): observed over random-expected intersection",
        per_tensor=lambda f: _safe_div(f[count], _random_expected(f, region)),
        aggregate=lambda f: _div(_sum(f, count), float(_random_expected(f, region).sum())),
    )


def _magnitude_spec(name: str, count: str, baseline: str) -> MetricSpec:
    return MetricSpec(
        name=name,
        analysis="principal",
        column=name,
        needs=("changed", count),  # the baseline column may be NaN where nothing changed
        statuses=COMPARABLE,
        aggregation=f"Σ{count} / Σ(changed·{baseline}): observed over magnitude-matched expected intersection",
        per_tensor=lambda f: _safe_div(f[count], _magnitude_expected(f, baseline)),
        aggregate=lambda f: _div(_sum(f, count), float(_magnitude_expected(f, baseline).sum(skipna=False))),
    )


def _spectral_spec(name: str) -> MetricSpec:
    return MetricSpec(
        name=name,
        analysis="spectral",
        column=name,
        needs=(name,),
        statuses=COMPARABLE,
        aggregation="maximum over the scope (the worst matrix)",
        per_tensor=_col(name),
        aggregate=_max(name),
    )


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            name="sparsity",
            analysis="sparsity",
            column="sparsity",
            needs=("changed", "numel"),
            statuses=FLOAT_COMPARED,
            aggregation="1 − Σchanged / Σnumel (parameter-weighted)",
            per_tensor=lambda f: 1.0 - _safe_div(f["changed"], f["numel"]),
            aggregate=lambda f: 1.0 - _div(_sum(f, "changed"), _sum(f, "numel")),
        ),
        MetricSpec(
            name="density",
            analysis="sparsity",
            column="density",
            needs=("changed", "numel"),
            statuses=FLOAT_COMPARED,
            aggregation="Σchanged / Σnumel (parameter-weighted)",
            per_tensor=lambda f: _safe_div(f["changed"], f["numel"]),
            aggregate=lambda f: _div(_sum(f, "changed"), _sum(f, "numel")),
        ),
        MetricSpec(
            name="changed",
            analysis="sparsity",
            column="changed",
            needs=("changed",),
            statuses=COMPARABLE,
            aggregation="Σchanged (entries, integer tensors included)",
            per_tensor=_col("changed"),
            aggregate=lambda f: _sum(f, "changed"),
        ),
        _overlap_spec("overlap_principal", "changed_principal"),
        _overlap_spec("overlap_low", "changed_low"),
        _overlap_spec("overlap_principal_not_low", "changed_principal_not_low"),
        _ratio_spec("ratio_principal", "changed_principal", "principal_size"),
        _ratio_spec("ratio_low", "changed_low", "low_size"),
        _ratio_spec("ratio_principal_not_low", "changed_principal_not_low", "principal_not_low_size"),
        _magnitude_spec("ratio_principal_magnitude", "changed_principal", "baseline_principal_magnitude"),
        _magnitude_spec("ratio_low_magnitude", "changed_low", "baseline_low_magnitude"),
        MetricSpec(
            name="energy_principal",
            analysis="principal",
            column="energy_principal",
            needs=("energy_principal", "delta_fro_sq"),
            statuses=COMPARABLE,
            aggregation="Σ(energy_principal·delta_fro_sq) / Σdelta_fro_sq (weighted by update energy)",
            per_tensor=_col("energy_principal"),
            aggregate=lambda f: _div(
                float((f["energy_principal"].astype("float64") * f["delta_fro_sq"].astype("float64")).sum()),
                _sum(f, "delta_fro_sq"),
            ),
        ),
        _spectral_spec("nss"),
        _spectral_spec("angle_u_max_deg"),
        _spectral_spec("angle_v_max_deg"),
        _spectral_spec("angle_u_mean_deg"),
        _spectral_spec("angle_v_mean_deg"),
        _spectral_spec("sv_topk_max_rel_change"),
        _spectral_spec("delta_rel_fro"),
        _spectral_spec("nss_per_update"),
        _spectral_spec("nss_null_ratio"),
        _spectral_spec("angle_u_max_null_ratio"),
        _spectral_spec("angle_v_max_null_ratio"),
    )
}


def required_analyses(rules: Iterable[Rule], structural: StructuralRules | None = None) -> set[str]:
    """The analyses the rules need; structural checks read the sparsity frame."""
    needed: set[str] = set()
    for rule in rules:
        spec = METRICS.get(rule.metric)
        if spec is None:
            raise InputError(_unknown_metric(rule.metric, str(rule)))
        needed.add(spec.analysis)
    if structural is not None and structural.active:
        needed.add("sparsity")
    return needed


# ---------------------------------------------------------------------------------------------
# TOML configuration

_CONFIG_KEYS = ("rules", "expect_unchanged", "allow_changed", "same_keys", "same_shapes", "same_dtypes")


@dataclass(frozen=True)
class CheckConfig:
    """Rules and structural checks from the command line, a rules file or pyproject.toml."""

    rules: tuple[Rule, ...] = ()
    structural: StructuralRules = field(default_factory=StructuralRules)

    def merged(self, other: CheckConfig) -> CheckConfig:
        """Both configs together: rules and globs concatenated, boolean checks or-ed."""
        a, b = self.structural, other.structural
        return CheckConfig(
            rules=self.rules + other.rules,
            structural=StructuralRules(
                same_keys=a.same_keys or b.same_keys,
                same_shapes=a.same_shapes or b.same_shapes,
                same_dtypes=a.same_dtypes or b.same_dtypes,
                expect_unchanged=a.expect_unchanged + b.expect_unchanged,
                allow_changed=a.allow_changed + b.allow_changed,
            ),
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist: check the --config path") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config file {path} is not valid TOML ({exc}): fix the syntax") from None
    except OSError as exc:
        raise InputError(f"cannot read config file {path} ({exc.strerror}): check the path") from None


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"'{key}' in {where} must be a list of strings, e.g. {key} = [\"...\"]")
    return tuple(value)


def _flag(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"'{key}' in {where} must be true or false")
    return value


def config_from_table(table: dict[str, Any], where: str) -> CheckConfig:
    """A CheckConfig from a TOML table; keys may use '-' or '_'; unknown keys are an input error."""
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in _CONFIG_KEYS:
            raise InputError(f"unknown key {raw_key!r} in {where}: use {', '.join(_CONFIG_KEYS)}")
        values[key] = value
    rules = tuple(parse_rule(text, where) for text in _strings(values.get("rules", []), "rules", where))
    structural = StructuralRules(
        same_keys=_flag(values.get("same_keys", False), "same_keys", where),
        same_shapes=_flag(values.get("same_shapes", False), "same_shapes", where),
        same_dtypes=_flag(values.get("same_dtypes", False), "same_dtypes", where),
        expect_unchanged=_strings(values.get("expect_unchanged", []), "expect_unchanged", where),
        allow_changed=_strings(values.get("allow_changed", []), "allow_changed", where),
    )
    return CheckConfig(rules=rules, structural=structural)


def _check_table(data: dict[str, Any]) -> dict[str, Any] | None:
    """The rules of a parsed pyproject.toml: [tool.ckptdiff.check] if present, else [tool.ckptdiff] itself."""
    tool = data.get("tool", {}).get("ckptdiff")
    if not isinstance(tool, dict):
        return None
    table = tool.get("check", tool)
    return table if isinstance(table, dict) else None


def load_config(path: Path) -> CheckConfig:
    """Load a rules file (top-level keys), or a pyproject.toml's [tool.ckptdiff] (or .check) table."""
    data = _read_toml(path)
    table = _check_table(data)
    if table is not None:
        return config_from_table(table, f"{path} [tool.ckptdiff]")
    return config_from_table(data, str(path))


def load_pyproject(directory: Path) -> CheckConfig | None:
    """The [tool.ckptdiff] (or .check) table of directory/pyproject.toml; None when absent."""
    path = directory / "pyproject.toml"
    if not path.is_file():
        return None
    table = _check_table(_read_toml(path))
    return None if table is None else config_from_table(table, f"{path} [tool.ckptdiff]")


# ---------------------------------------------------------------------------------------------
# Evaluation


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


def _evaluate_metric(rule: Rule, frames: dict[str, pd.DataFrame], max_offenders: int) -> RuleResult:
    spec = METRICS.get(rule.metric)
    if spec is None:
        raise InputError(_unknown_metric(rule.metric, str(rule)))
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
        return RuleResult(
            rule=str(rule),
            kind="metric",
            op=rule.op,
            threshold=rule.value,
            value=math.nan,
            passed=False,
            n_tensors=len(in_scope),
            offenders=listed,
            n_offenders=len(broken),
            note=f"{len(broken)} matrix(es) in scope hold NaN or inf values, so {rule.metric} is undefined for them",
        )
    usable = in_scope[in_scope["status"].isin(spec.statuses) & in_scope[list(spec.needs)].notna().all(axis=1)]
    if usable.empty:
        raise InputError(
            f"rule '{rule}' matches {len(in_scope)} tensor(s) but none has a {rule.metric} value "
            f"(not compared, or no {spec.analysis} analysis for them): narrow or fix the scope"
        )
    value = spec.aggregate(usable)
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


def _structural_result(name: str, n_tensors: int, violations: Sequence[Offender], max_offenders: int) -> RuleResult:
    return RuleResult(
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
        Offender(str(t), None, str(d) if isinstance(d, str) and d else _STATUS_TEXT.get(s, s))
        for t, s, d in zip(rows["tensor"], rows["status"], notes, strict=True)
    ]


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
    changed = frame["status"].isin([DTYPE_CHANGED, KIND_MISMATCH])
    if "dtype_base" in frame.columns and "dtype_ft" in frame.columns:
        base, ft = frame["dtype_base"].fillna("").astype(str), frame["dtype_ft"].fillna("").astype(str)
        changed |= (base != "") & (ft != "") & (base != ft)
    return changed


def _evaluate_structural(structural: StructuralRules, frame: pd.DataFrame, max_offenders: int) -> list[RuleResult]:
    _require_columns(frame, ("changed",), "sparsity")
    frame = frame.sort_values("tensor", kind="stable")
    n = len(frame)
    results: list[RuleResult] = []
    if structural.same_keys:
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
            raise InputError(f"--expect-unchanged {glob!r} matches no tensor: check the glob against the tensor names")
        results.append(_structural_result(f"unchanged@{glob}", len(rows), _changed_offenders(rows), max_offenders))
    if structural.allow_changed:
        allowed = pd.Series(False, index=frame.index)
        for glob in structural.allow_changed:
            hit = _matching(frame["tensor"], glob)
            if not hit.any():
                raise InputError(f"--allow-changed {glob!r} matches no tensor: check the glob against the tensor names")
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


def check_scopes(rules: Iterable[Rule], structural: StructuralRules | None, names: Iterable[str]) -> None:
    """Fail early (InputError) on a rule or structural glob that matches none of the given tensor names."""
    name_list = list(names)
    globs = [(f"rule '{r}'", r.scope) for r in rules if r.scope is not None]
    if structural is not None:
        globs += [("--expect-unchanged", g) for g in structural.expect_unchanged]
        globs += [("--allow-changed", g) for g in structural.allow_changed]
    for where, glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in name_list):
            raise InputError(f"{where}: scope {glob!r} matches no tensor: check the glob against the tensor names")


# ---------------------------------------------------------------------------------------------
# Rendering


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
        lines.append(f"| {_md(r.rule)} | {format_value(r.value)} | {r.op} {exact_number(r.threshold)} | {outcome} |")
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
