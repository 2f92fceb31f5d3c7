"""Rules for ``ckptdiff check``: parsing, the metric registry, TOML config, evaluation and rendering.

One module each: :mod:`.rules` (a rule's grammar and the metrics it may name), :mod:`.config`, :mod:`.evaluate`;
and :mod:`.report` (a result as a dict and as Markdown); this package re-exports their public names.

A metric rule reads ``METRIC[@GLOB] OP VALUE`` (``sparsity@model.layers.*.mlp.* >= 0.3``); the glob is
matched with ``fnmatch.fnmatchcase`` against full tensor names (``*`` also crosses dots). Structural rules
(``StructuralRules``) check the key set, shapes, dtypes and which tensors may change.

Which per-tensor columns each metric reads and how a scope aggregates them is declared once, with the analyses'
other figures, in :mod:`ckptdiff.analyses.scopes`; :mod:`.evaluate` says how rows enter a rule.
"""

from ckptdiff.gate.config import CheckConfig, config_from_table, load_config, load_pyproject
from ckptdiff.gate.evaluate import (
    MAX_OFFENDERS,
    CheckResult,
    Offender,
    RuleResult,
    check_scopes,
    evaluate,
    exit_code,
)
from ckptdiff.gate.report import format_value, to_dict, to_markdown
from ckptdiff.gate.rules import (
    METRICS,
    RULE_FORM,
    Op,
    Rule,
    StructuralRules,
    exact_number,
    parse_rule,
    required_analyses,
)

__all__ = [
    "MAX_OFFENDERS",
    "METRICS",
    "RULE_FORM",
    "CheckConfig",
    "CheckResult",
    "Offender",
    "Op",
    "Rule",
    "RuleResult",
    "StructuralRules",
    "check_scopes",
    "config_from_table",
    "evaluate",
    "exact_number",
    "exit_code",
    "format_value",
    "load_config",
    "load_pyproject",
    "parse_rule",
    "required_analyses",
    "to_dict",
    "to_markdown",
]
