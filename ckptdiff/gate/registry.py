"""The metrics a rule can name: the analyses' own declarations (:mod:`ckptdiff.analyses.scopes`), not a copy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ckptdiff.analyses.scopes import GATES, Metric
from ckptdiff.errors import InputError

if TYPE_CHECKING:
    from ckptdiff.gate.parse import Rule, StructuralRules

METRICS: dict[str, Metric] = GATES


def unknown_metric(metric: str, text: str) -> str:
    """The one-line message for a rule naming a metric nobody declares."""
    return f"unknown metric {metric!r} in rule {text!r}: use one of {', '.join(sorted(METRICS))}"


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
