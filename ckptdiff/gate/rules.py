"""Rules as text: ``METRIC[@GLOB] OP VALUE`` metric rules, the structural checks, and the metrics a rule can name
(the analyses' own declarations in :mod:`ckptdiff.analyses.scopes`, not a copy).

The glob is matched with ``fnmatch.fnmatchcase`` against full tensor names (``*`` also crosses dots).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ckptdiff.analyses.scopes import GATES, Metric
from ckptdiff.errors import InputError

Op = Literal["<", "<=", ">", ">=", "==", "!="]
RULE_FORM = "METRIC[@GLOB] OP VALUE, e.g. 'sparsity@model.layers.*.mlp.* >= 0.3'"

METRICS: dict[str, Metric] = GATES


def unknown_metric(metric: str, text: str) -> str:
    """The one-line message for a rule naming a metric nobody declares: the nearest names when one is close
    (``sparsty`` -> ``sparsity``), else every metric."""
    import difflib

    near = difflib.get_close_matches(metric, list(METRICS), n=3, cutoff=0.7)
    if near:
        guess = " or ".join(near)
        return f"unknown metric {metric!r} in rule {text!r}: did you mean {guess}? (docs/check.md lists all)"
    return f"unknown metric {metric!r} in rule {text!r}: use one of {', '.join(sorted(METRICS))}"


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RULE_RE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_]\w*)\s*"
    r"(?:@\s*(?P<scope>[^\s<>=]+))?\s*"  # a glob: no spaces or comparison characters ('!' allowed for [!x])
    r"(?P<op><=|>=|==|!=|<|>)\s*"
    rf"(?P<value>{_NUMBER})\s*$"
)


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
        raise InputError(unknown_metric(metric, text))
    op: Op = match["op"]  # type: ignore[assignment]  # the regex admits only the six operators
    value = float(match["value"])
    if not math.isfinite(value):  # 1e999: no metric can be compared with it, and JSON cannot hold it
        raise InputError(
            f"rule {text!r} from {origin}: the threshold {match['value']} is beyond a 64-bit float (about 1.8e308); "
            "give a finite number"
        )
    return Rule(metric=metric, scope=match["scope"], op=op, value=value)


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


def required_analyses(rules: Iterable[Rule], structural: StructuralRules | None = None) -> set[str]:
    """The analyses the rules need; structural checks read the sparsity frame."""
    needed: set[str] = set()
    for rule in rules:
        spec = METRICS.get(rule.metric)
        if spec is None:
            raise InputError(unknown_metric(rule.metric, str(rule)))
        needed.add(spec.analysis)
    if structural is not None and structural.active:
        needed.add("sparsity")
    return needed
