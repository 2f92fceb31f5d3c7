"""`ckptdiff check`: turn any ckptdiff metric into a release gate (exit 0 pass, 1 fail, 2 bad input).

The rules themselves (parsing, the metric registry, evaluation, rendering) live in :mod:`ckptdiff.gate`.
This module gathers the configuration, runs only the analyses the rules need (a sparsity-only rule set never
runs an SVD) together in one pass of the pipeline, so every byte is read once, and evaluates them.
``header_only`` answers structural rules from safetensors headers alone, without reading any tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ckptdiff import choices
from ckptdiff import gate as R
from ckptdiff.analyses.base import item_detail, row_basics
from ckptdiff.choices import DEFAULT_K, merged_dtype
from ckptdiff.engine.alignment import Aligned, Status, align
from ckptdiff.engine.header import runtime
from ckptdiff.engine.pipeline import Analysis, execute, open_run
from ckptdiff.errors import InputError
from ckptdiff.gate.config import pyproject_table
from ckptdiff.gate.evaluate import COUNTS as STRUCTURAL_COUNTS
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.io.views import ties
from ckptdiff.metrics.mask import CompareMode
from ckptdiff.runtime.distributed import agree

if TYPE_CHECKING:
    import torch

ANALYSIS_ORDER = ("sparsity", "principal", "spectral")
NULL_METRICS = frozenset(
    name for name in R.METRICS if "_null_" in name or name.endswith("_null")
)  # need spectral's random null


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GatheredConfig:
    """The rules to check and where they came from (for the report header)."""

    config: R.CheckConfig
    origin: str


def gather_config(config_file: Path | None, cli: R.CheckConfig, cwd: Path | None = None) -> GatheredConfig:
    """--config when given, else ``[tool.ckptdiff]`` of ``cwd/pyproject.toml`` when present, plus CLI rules."""
    origins: list[str] = []
    found: R.CheckConfig | None = None
    if config_file is not None:
        found = R.load_config(config_file)
        origins.append(str(config_file))
    else:
        where = cwd if cwd is not None else Path.cwd()
        table = pyproject_table(where)
        if table is not None:
            found, read = table
            origins.append(read)  # names the table it read: [tool.ckptdiff] or [tool.ckptdiff.check]
    if cli.rules or cli.structural.active:
        origins.append("command line")
    return GatheredConfig((found or R.CheckConfig()).merged(cli), " + ".join(origins))


# ---------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class GateResult:
    """Every rule's outcome plus what was compared and how; renders to a dict, JSON and Markdown."""

    header: dict[str, str]
    outcome: R.CheckResult
    analyses: tuple[str, ...] = ()

    def __repr__(self) -> str:
        n_pass = sum(r.passed for r in self.outcome.results)
        verdict = "PASS" if self.passed else "FAIL"
        return f"<GateResult: {verdict}, {n_pass}/{len(self.outcome.results)} rules pass; .to_dict() .to_markdown()>"

    @property
    def passed(self) -> bool:
        """Whether every rule passed."""
        return self.outcome.passed

    @property
    def exit_code(self) -> int:
        """0 when every rule passes, 1 when one fails."""
        return R.exit_code(self.outcome)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the header, the analyses run, and each rule's outcome."""
        return {"header": dict(self.header), "analyses": list(self.analyses), **R.to_dict(self.outcome)}

    def to_json(self) -> str:
        """The dict as indented JSON (NaN written as null)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        """The rules' Markdown summary, with one closing line naming the inputs (for a CI step summary)."""
        ran = ", ".join(self.analyses) or "none"
        inputs = f"Base `{self.header['base']}`, fine-tune `{self.header['ft']}`; analyses run: {ran}."
        return R.to_markdown(self.outcome) + "\n" + inputs + "\n"


# ---------------------------------------------------------------------------------------------
# Running the analyses a rule set needs


@dataclass(frozen=True)
class Shared:
    """Options every analysis gets: the tensor filters, the device, the comparison mode and progress."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    device: str = "auto"
    mode: CompareMode = field(default_factory=CompareMode)
    k: int | None = None  # top-k for the principal and spectral analyses; None keeps their defaults
    progress: bool = True
    merged_dtype: str | None = None  # a PEFT adapter FT: what its merged weights are stored as (base's dtype)
    # What principal-overlap and spectral values depend on, with the single commands' defaults.
    alpha: float = 0.5
    svd: str = "auto"
    principal_precision: str = "fp32"
    spectral_precision: str = "fp64"
    null: str | bool = "none"  # a rule on a *_null_* metric runs the random null whatever this says
    seed: int = 0


def _k(shared: Shared) -> dict[str, Any]:
    return {} if shared.k is None else {"k": shared.k}


def plugins(needed: set[str], shared: Shared, metrics: set[str]) -> dict[str, Analysis]:
    """The analyses a rule set needs, configured as the single commands would be, in ANALYSIS_ORDER."""
    from ckptdiff.analyses.principal import PrincipalAnalysis
    from ckptdiff.analyses.sparsity import SparsityAnalysis
    from ckptdiff.analyses.spectral import SpectralAnalysis

    out: dict[str, Analysis] = {}
    if "sparsity" in needed:
        out["sparsity"] = SparsityAnalysis(shared.mode)
    if "principal" in needed:
        out["principal"] = PrincipalAnalysis(
            mode=shared.mode, alpha=shared.alpha, svd=shared.svd, precision=shared.principal_precision, **_k(shared)
        )
    if "spectral" in needed:
        # the *_null_ratio metrics compare against a random update of the same size
        null = choices.null_kind(shared.null) or bool(metrics & NULL_METRICS)
        out["spectral"] = SpectralAnalysis(
            as_dtype=shared.mode.as_dtype,
            null=null,
            precision=shared.spectral_precision,
            seed=shared.seed,
            **_k(shared),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Structural checks from headers


def param_count_result(items: Sequence[Aligned]) -> R.RuleResult:
    """same_param_count: Σnumel of the base against the fine-tune, with the tensors that account for the gap."""
    totals = [0, 0]
    offenders: list[R.Offender] = []
    for it in items:
        counts = [info.numel if info is not None else 0 for info in (it.infos[0], it.infos[-1])]
        totals = [totals[0] + counts[0], totals[1] + counts[1]]
        if counts[0] != counts[1]:
            why = f" ({it.detail})" if it.status is Status.TIE_CHANGED else ""
            offenders.append(
                R.Offender(it.name, float(counts[1] - counts[0]), f"parameters {counts[0]} -> {counts[1]}{why}")
            )
    offenders.sort(key=lambda o: (-abs(o.value or 0.0), o.tensor))
    gap = float(abs(totals[1] - totals[0]))
    return R.RuleResult(
        rule="same_param_count",
        kind="structural",
        counts=STRUCTURAL_COUNTS["same_param_count"],
        op="==",
        threshold=0.0,
        value=gap,
        passed=gap == 0,
        n_tensors=len(items),
        offenders=tuple(offenders[: R.MAX_OFFENDERS]),
        n_offenders=len(offenders),
        note="" if gap == 0 else f"base has {totals[0]:,} parameters, fine-tune {totals[1]:,}",
    )


def header_frame(items: Sequence[Aligned]) -> pd.DataFrame:
    """The per-tensor frame structural rules read, from headers alone (``changed`` is unknown: NA)."""
    rows = [{**row_basics(it), "detail": item_detail(it), "changed": pd.NA} for it in items]
    columns = [
        "tensor",
        "stack",
        "layer",
        "module",
        "expert",
        "shape",
        "dtype_base",
        "dtype_ft",
        "numel",
        "linear",
        "status",
    ]
    columns.append("detail")
    return pd.DataFrame(rows, columns=[*columns, "changed"]).astype({"numel": "Int64", "changed": "Int64"})


def _reject_for_header_only(config: R.CheckConfig) -> None:
    if config.rules:
        listed = ", ".join(f"'{r}'" for r in config.rules[:3]) + (" ..." if len(config.rules) > 3 else "")
        raise InputError(
            f"--header-only supports structural rules only (same keys, shapes, dtypes, parameter count), "
            f"but {listed} needs tensor data: drop --header-only or those rules"
        )
    s = config.structural
    if s.expect_unchanged or s.allow_changed:
        raise InputError(
            "--header-only cannot tell whether values changed (--expect-unchanged / --allow-changed need tensor "
            "data): drop --header-only or those checks"
        )


# ---------------------------------------------------------------------------------------------
# The entry point


def check(
    base: SourceLike,
    ft: SourceLike,
    config: R.CheckConfig | None = None,
    *,
    rules: Sequence[str] = (),
    shared: Shared | None = None,
    header_only: bool = False,
    same_param_count: bool = False,
    origin: str = "",
    **options: Any,
) -> GateResult:
    """Evaluate rules on ``ft`` against ``base``, running only the analyses they need, in one pass.

    From Python: ``ckptdiff.check(base, ft, rules=["sparsity >= 0.5", "nss@*.mlp.* < 1e-3"])``; rules are
    ``METRIC[@GLOB] OP VALUE`` (README, check). ``config`` (a :class:`~ckptdiff.gate.CheckConfig`) adds structural
    rules; ``shared`` or keywords (``include``, ``exclude``, ``device``, ``mode``, ``k``, ``progress``, ``alpha``,
    ``svd``, ``principal_precision``, ``spectral_precision``, ``null``, ``seed``) set the options every analysis
    gets. ``.passed``, ``.exit_code`` and ``.to_dict()`` give the outcome.
    """
    parsed = tuple(R.parse_rule(text, "rules=") for text in rules)
    config = R.CheckConfig(rules=parsed).merged(config) if config is not None else R.CheckConfig(rules=parsed)
    if shared is not None and options:
        raise InputError("pass either shared= or option keywords (include=, device=, k=, ...), not both")
    try:
        shared = shared or Shared(**options)
    except TypeError as e:
        known = ", ".join(f.name for f in fields(Shared))
        raise InputError(f"check(): {e}; options are {known}") from None
    if not config.rules and not config.structural.active and not same_param_count:
        raise InputError(
            "no rules to check: pass --rule 'METRIC[@GLOB] OP VALUE', a structural flag such as --same-keys, "
            "or --config rules.toml (a [tool.ckptdiff] table in ./pyproject.toml is read too)"
        )
    needed = R.required_analyses(config.rules, config.structural) if not header_only else set()
    if header_only:
        _reject_for_header_only(config)
        opened = _open_headers(base, ft, merged_dtype(shared.merged_dtype))
        try:
            items = align(opened, shared.include, shared.exclude, labels=["base", "ft"])
            R.check_scopes(config.rules, config.structural, (it.name for it in items), ties.aliases(opened))
            frames = {"sparsity": header_frame(items)}
            resolved = [s.resolved for s in opened]
            tied = ties.describe(opened, ["base", "ft"])
            device = "none (headers only)"
        finally:
            for s in opened:
                s.close()
    else:
        todo = plugins(needed, shared, {r.metric for r in config.rules})
        with open_run(
            [base, ft],
            labels=("base", "ft"),
            include=shared.include,
            exclude=shared.exclude,
            device=shared.device,
            progress=shared.progress,
            merged_dtype=shared.merged_dtype,
        ) as run:
            items = list(run.items)
            names = [it.name for it in items]
            aliases = ties.aliases(run.sources)
            agree(lambda: R.check_scopes(config.rules, config.structural, names, aliases), "checking scopes")
            results = execute(run, list(todo.values()), shared.progress, "checking")
            frames = {name: r.to_frame() for name, r in zip(todo, results, strict=True)}
            resolved = [s.resolved for s in run.sources]
            tied = ties.describe(run.sources, ["base", "ft"])
            device = str(run.device)
    structural = config.structural if config.structural.active else None
    outcome = R.evaluate(config.rules, frames, structural)
    if same_param_count:
        outcome = R.CheckResult((*outcome.results, param_count_result(items)))
    ran = tuple(a for a in ANALYSIS_ORDER if a in frames and not header_only)
    head = _header(resolved, tied, shared, header_only, origin, needed, device)
    found = fp8_findings(items)
    if found:
        head["fp8_findings"] = found
    return GateResult(head, outcome, ran)


def fp8_findings(items: Sequence[Aligned], most: int = 5) -> str:
    """The tensors whose FP8 storage could not be read as intended (ckptdiff.io.views.fp8), for the report header."""
    from ckptdiff.io.views.fp8 import notes

    found = [f"{it.name}: {note}" for it in items if (note := notes(it.infos))]
    more = f"; ... {len(found)} in all" if len(found) > most else ""
    return "; ".join(found[:most]) + more


def _open_headers(base: SourceLike, ft: SourceLike, merged: torch.dtype | None) -> list[Source]:
    from ckptdiff.io.formats.headers_only import open_headers
    from ckptdiff.io.resolve import logical

    first = base if isinstance(base, Source) else logical(open_headers(str(base)))
    return [first, ft if isinstance(ft, Source) else logical(open_headers(str(ft)), base=first, merged_dtype=merged)]


def _header(
    resolved: Sequence[str], tied: str, shared: Shared, header_only: bool, origin: str, needed: set[str], device: str
) -> dict[str, str]:
    from ckptdiff import __version__

    out = {"analysis": "check", "ckptdiff": __version__, "base": resolved[0], "ft": resolved[1]}
    if tied:
        out["tied"] = tied
    if origin:
        out["rules_from"] = origin
    out["mode"] = "header-only (no tensor data read)" if header_only else shared.mode.describe()
    if shared.include:
        out["include"] = ", ".join(shared.include)
    if shared.exclude:
        out["exclude"] = ", ".join(shared.exclude)
    if needed & {"principal", "spectral"}:
        out["k"] = str(shared.k if shared.k is not None else DEFAULT_K)
    if "principal" in needed:
        out |= {"alpha": str(shared.alpha), "svd": str(shared.svd), "precision": str(shared.principal_precision)}
    if "spectral" in needed:
        out["spectral_precision"] = str(shared.spectral_precision)
    return {**out, **runtime(device)}
