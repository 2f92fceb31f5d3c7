"""`ckptdiff report`: every analysis in one pass, written as a directory a person can open or paste.

For each fine-tune the pairwise analyses (sparsity, principal-overlap, spectral) compare it with the base; with
two or more fine-tunes, consistency compares them with each other. All of them are plug-ins of one pipeline
run, so each checkpoint is read once whatever the number of analyses.

The directory holds ``tensors.csv`` (one row per tensor and fine-tune: every per-tensor column of every analysis
that ran, under the single commands' names and with their values), ``report.json``, ``report.md`` with its
figures under ``figures/``, and ``index.html``, self-contained (figures inline, nothing fetched).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ckptdiff import choices
from ckptdiff.analyses.base import Report
from ckptdiff.analyses.compare import Comparison, comparison, verdict
from ckptdiff.analyses.consistency import ConsistencyAnalysis, ConsistencyResult, run_labels
from ckptdiff.analyses.principal import PrincipalAnalysis, PrincipalOverlapResult
from ckptdiff.analyses.sparsity import SparsityAnalysis, SparsityResult
from ckptdiff.analyses.spectral import SpectralAnalysis, SpectralDriftResult
from ckptdiff.engine.alignment import Aligned
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_analyses
from ckptdiff.errors import InputError, option
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.metrics.mask import CompareMode, compare_mode

# Columns every analysis's per-tensor rows share: they appear once in tensors.csv.
SHARED_COLUMNS = (
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
)


@dataclass(frozen=True)
class Settings:
    """The parameters of one ``report`` run that the analyses' plug-ins are built from."""

    mode: CompareMode
    k: int | None  # None: principal-overlap's default, spectral's per-matrix choice
    alpha: float
    svd: str
    principal_precision: str
    spectral_precision: str
    null: str | bool
    seed: int
    runs: tuple[str, ...]  # fine-tune labels
    null_draws: int = 1


@dataclass(frozen=True)
class Reported:
    """How ``report`` runs one analysis: under which key and heading, pairwise (once per fine-tune, against the
    base: ``sides`` is ``(0, r)``) or across every input at once (``sides`` is all of them), and its plug-in."""

    key: str
    title: str
    pairwise: bool
    plugin: Callable[[Settings, tuple[int, ...]], Analysis]


# The analyses ``report`` runs, in report order: a new analysis is one line here.
REPORTED: tuple[Reported, ...] = (
    Reported("sparsity", "Sparsity", True, lambda s, sides: SparsityAnalysis(s.mode, sides=sides)),
    Reported(
        "principal",
        "Principal overlap",
        True,
        lambda s, sides: PrincipalAnalysis(
            k=choices.DEFAULT_K if s.k is None else s.k,
            alpha=s.alpha,
            svd=s.svd,
            precision=s.principal_precision,
            mode=s.mode,
            sides=sides,
        ),
    ),
    Reported(
        "spectral",
        "Spectral drift",
        True,
        lambda s, sides: SpectralAnalysis(
            k=s.k,
            precision=s.spectral_precision,
            null=s.null,
            seed=s.seed,
            as_dtype=s.mode.as_dtype,
            svd=s.svd,
            null_draws=s.null_draws,
            sides=sides,
        ),
    ),
    Reported(
        "consistency",
        "Consistency across fine-tunes",
        False,
        lambda s, sides: ConsistencyAnalysis(s.runs, s.mode, sides=sides),
    ),
)


# A command whose name is not its analysis's key: `report -a principal-overlap` is `-a principal`.
COMMAND_NAMES = {"principal-overlap": "principal", "principal_overlap": "principal"}


def _reported() -> dict[str, Reported]:
    return {r.key: r for r in REPORTED}


@dataclass(frozen=True)
class FullReportResult:
    """The results of one ``report`` run: per analysis, per fine-tune (by label) for the pairwise ones, or under the
    run '' for an analysis across every fine-tune (consistency)."""

    header: dict[str, str]
    runs: tuple[str, ...]  # fine-tune labels, in the order given
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # analysis -> run ('' across runs) -> result

    def __repr__(self) -> str:
        return (
            f"<FullReportResult: {', '.join(self.analyses)} of {len(self.runs)} fine-tune(s) {', '.join(self.runs)}; "
            ".sparsity[run] .principal[run] .spectral[run] .consistency .tensors() .sections()>"
        )

    @property
    def sparsity(self) -> dict[str, SparsityResult]:
        """Sparsity per fine-tune."""
        return self.results.get("sparsity", {})

    @property
    def principal(self) -> dict[str, PrincipalOverlapResult]:
        """Principal overlap per fine-tune."""
        return self.results.get("principal", {})

    @property
    def spectral(self) -> dict[str, SpectralDriftResult]:
        """Spectral drift per fine-tune."""
        return self.results.get("spectral", {})

    @property
    def consistency(self) -> ConsistencyResult | None:
        """Consistency across the fine-tunes, when it ran."""
        return self.results.get("consistency", {}).get("")

    @property
    def analyses(self) -> tuple[str, ...]:
        """The analyses that ran, in report order."""
        return tuple(r.key for r in REPORTED if self.results.get(r.key))

    def comparison(self) -> Comparison:
        """The headline figures of every fine-tune side by side, each with its control and verdict word (made once;
        see :mod:`ckptdiff.analyses.compare`)."""
        return self._comparison

    @cached_property
    def _comparison(self) -> Comparison:
        return comparison(self)

    def verdict(self) -> list[str]:
        """What the fine-tunes did, in 2-4 plain sentences, each claim beside its control."""
        return list(self._verdict)

    @cached_property
    def _verdict(self) -> tuple[str, ...]:
        return tuple(verdict(self, self._comparison))

    def section_keys(self) -> list[tuple[str, str]]:
        """(analysis, run) per section, in the order of :meth:`sections` (run is '' across fine-tunes)."""
        return [(key, run) for key in self.analyses for run in self.results[key]]

    def sections(self) -> list[tuple[str, Report]]:
        """(heading, report) per analysis and fine-tune, in reading order.

        Each report is made once per result (the rollups behind it take seconds on a large model) and shared by
        every caller: the terminal, the HTML, the Markdown and the JSON of one ``report`` run. Treat it as
        read-only.
        """
        return list(self._sections)

    @cached_property
    def _sections(self) -> tuple[tuple[str, Report], ...]:
        several = len(self.runs) > 1
        titles = {key: r.title for key, r in _reported().items()}
        out: list[tuple[str, Report]] = []
        for key, run in self.section_keys():
            heading = f"{titles[key]}: {run}" if several and run else titles[key]
            out.append((heading, self.results[key][run].report()))
        return tuple(out)

    def tensors(self) -> pd.DataFrame:
        """One row per tensor (and per fine-tune, with a leading ``run`` column, when several).

        The pairwise analyses' per-tensor columns side by side, under the single commands' names and with their
        values. The columns every analysis shares (:data:`SHARED_COLUMNS`) appear once. A column that two
        analyses both have but mean differently (``changed``, ``compared_as``, ``detail``, ``analysed``,
        ``outcome``, ``k``) keeps its name for sparsity and is prefixed for the others (``principal_detail``,
        ``spectral_outcome``): :func:`split_columns` maps them back.
        """
        frames: list[pd.DataFrame] = []
        for run in self.runs:
            parts = {name: res[run].to_frame().set_index("tensor") for name, res in self._pairwise() if run in res}
            if not parts:
                continue
            clash = _clashes([list(df.columns) for df in parts.values()])
            joined: list[pd.DataFrame] = []
            for name, df in parts.items():
                if joined:
                    df = df.drop(columns=[c for c in SHARED_COLUMNS if c in df.columns])
                    df = df.rename(columns={c: f"{name}_{c}" for c in df.columns if c in clash})
                joined.append(df)
            both = pd.concat(joined, axis=1, join="outer").reset_index()
            if len(self.runs) > 1:
                both.insert(0, "run", run)
            frames.append(both)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _pairwise(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r.key, self.results.get(r.key, {})) for r in REPORTED if r.pairwise]

    def to_dict(self) -> dict[str, Any]:
        """The whole report, machine-readable: header, runs, and each analysis's full JSON report."""
        from ckptdiff.analyses.base import records, to_json_dict

        pairwise = {r.key for r in REPORTED if r.pairwise}
        out: dict[str, Any] = {"header": self.header, "runs": list(self.runs), "analyses": list(self.analyses)}
        side = self.comparison()
        out["verdict"] = self.verdict()
        out["comparison"] = {
            "values": records(side.values().reset_index()),
            "controls": records(side.controls().reset_index()),
            "words": records(side.words().reset_index()),
        }
        for (name, run), (_, section) in zip(self.section_keys(), self._sections, strict=True):
            if name in pairwise:
                out.setdefault(name, {})[run] = to_json_dict(section)
            else:
                out[name] = to_json_dict(section)
        return out


def _clashes(columns: Sequence[Sequence[str]]) -> set[str]:
    """Non-shared column names that more than one analysis uses."""
    seen: dict[str, int] = {}
    for cols in columns:
        for c in cols:
            seen[c] = seen.get(c, 0) + 1
    return {c for c, n in seen.items() if n > 1 and c not in SHARED_COLUMNS}


def split_columns(tensors: pd.DataFrame, analysis: str, columns: Sequence[str]) -> pd.DataFrame:
    """The columns of one analysis's single-command CSV, taken back out of ``tensors.csv`` (renamed as there)."""
    out = {}
    for c in columns:
        prefixed = f"{analysis}_{c}"
        out[c] = tensors[prefixed] if prefixed in tensors.columns and c not in SHARED_COLUMNS else tensors[c]
    return pd.DataFrame(out)


def _analyses_for(chosen: Sequence[str], n_fts: int) -> tuple[str, ...]:
    known = _reported()
    chosen = [COMMAND_NAMES.get(a.strip().lower(), a.strip().lower()) for a in chosen]
    unknown = [a for a in chosen if a not in known]
    if unknown:
        names = ", ".join(
            k + "".join(f" ({c})" for c, v in COMMAND_NAMES.items() if v == k and "-" in c) for k in known
        )
        raise InputError(f"{option('--analyses')}: unknown analysis {unknown[0]!r}; choose from {names}")
    across = [a for a in chosen if not known[a].pairwise]
    if across and n_fts < 2:
        what = f"{option('--analyses')} {across[0]}"
        raise InputError(f"{what} needs at least 2 fine-tuned checkpoints; pass two or more after BASE")
    return tuple(r.key for r in REPORTED if r.key in chosen)


def _default_analyses(n_fts: int) -> tuple[str, ...]:
    """Every pairwise analysis, and those across fine-tunes when there are two or more."""
    return tuple(r.key for r in REPORTED if r.pairwise or n_fts > 1)


def full_report(
    base: SourceLike,
    fts: Sequence[SourceLike],
    *,
    labels: Sequence[str] | None = None,
    analyses: Sequence[str] | None = None,
    mode: CompareMode | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
    k: int | None = None,
    alpha: float = 0.5,
    svd: str = "auto",
    principal_precision: str = "fp32",
    spectral_precision: str = "fp64",
    null: str | bool = "none",
    seed: int = 0,
    null_draws: int = 1,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    batch_budget: float | None = None,
    progress: bool = True,
    merged_dtype: torch.dtype | str | None = None,
) -> FullReportResult:
    """Run every analysis (or ``analyses``) of ``fts`` against ``base`` in one pass of the checkpoints.

    Defaults are the single commands' defaults; consistency runs when two or more fine-tunes are given.
    """
    mode = compare_mode(mode, rtol=rtol, atol=atol, as_dtype=as_dtype)
    if isinstance(fts, (str, Path, Source)):
        fts = [fts]  # type: ignore[list-item]
    names = run_labels(fts, labels, minimum=1, command="report")
    chosen = _analyses_for(analyses if analyses is not None else _default_analyses(len(fts)), len(fts))
    settings = Settings(
        mode, k, alpha, svd, principal_precision, spectral_precision, null, seed, tuple(names), null_draws
    )
    plugins: list[tuple[str, str, Analysis]] = []
    for key in chosen:
        entry = _reported()[key]
        if entry.pairwise:
            plugins += [(key, run, entry.plugin(settings, (0, r))) for r, run in enumerate(names, start=1)]
        else:
            plugins.append((key, "", entry.plugin(settings, tuple(range(len(names) + 1)))))
    params: dict[str, object] = {
        "analyses": ", ".join(chosen),
        "k": k if k is not None else f"{choices.DEFAULT_K} for principal-overlap; spectral chooses k per matrix",
        "alpha": alpha,
        "svd": f"{svd} ({principal_precision})",
        "spectral_precision": spectral_precision,
        "null": "random" if null in (True, "random") else "none",
    }
    if params["null"] == "random":
        params["seed"] = seed
    if null_draws > 1:
        params["null_draws"] = f"{null_draws} (seeds {seed} to {seed + null_draws - 1})"
    head = _Header(len(names), mode, params)
    *results, header = run_analyses(
        [base, *fts],
        [*(p for _, _, p in plugins), head],
        labels=["base", *names],
        include=include,
        exclude=exclude,
        device=device,
        batch_budget=batch_budget,
        progress=progress,
        label="report",
        merged_dtype=merged_dtype,
    )
    out: dict[str, dict[str, Any]] = {}
    for (name, run, _), result in zip(plugins, results, strict=True):
        out.setdefault(name, {})[run] = result
    order = ("", *names)
    ordered = {r.key: {run: out[r.key][run] for run in order if run in out[r.key]} for r in REPORTED if r.key in out}
    return FullReportResult(header, tuple(names), ordered)


class _Header(Analysis):
    """Reads nothing; its result is the report's header (inputs as resolved, mode, parameters, device)."""

    name = "header"

    def __init__(self, n_fts: int, mode: CompareMode, params: dict[str, object]):
        super().__init__(range(n_fts + 1))
        self.mode = mode
        self.params = params

    def form(self, item: Aligned) -> Form | None:
        return None

    def finish(self, run: Run) -> dict[str, str]:
        return run.header("report", self.sides, self.mode, **self.params)
