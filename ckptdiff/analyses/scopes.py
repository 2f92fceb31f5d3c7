"""Every scope metric, declared once: its per-tensor value and how a scope of tensors becomes one number.

An analysis's per-tensor rows (its CSV) hold counts and per-tensor figures; a *metric* here says how to turn
any set of those rows (a layer, a module type, a glob of a ``check`` rule, the whole model) into one figure.
The analyses' rollup tables, their summary sentences and ``check``'s rule registry all evaluate these same
declarations, so a rollup is never derived twice. Nothing here imports torch.

Aggregations (docs/metrics.md says why each is the right one):

- counts add up (``changed``, ``numel``, ULP buckets);
- fractions are ratios of sums (``sparsity = 1 − Σchanged / Σnumel``: parameter-weighted);
- overlaps are weighted by updated entries, their baselines summed as expected intersections;
- energies are weighted by the update's energy ‖ΔW‖_F²;
- spectral drift is not additive: a scope reports its worst matrix (``max``), with the median beside it in
  the rollup tables; ``nss_per_update`` is a per-parameter rate, so its scope figure is the mean weighted by
  parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from ckptdiff.engine.alignment import COMPARABLE as _COMPARABLE
from ckptdiff.engine.alignment import FLOAT_COMPARED as _FLOAT_COMPARED
from ckptdiff.metrics.numeric import ratio
from ckptdiff.naming import stack_rank

AnalysisName = Literal["sparsity", "principal", "spectral", "trajectory"]
COMPARABLE = frozenset(s.value for s in _COMPARABLE)
FLOAT_COMPARED = frozenset(s.value for s in _FLOAT_COMPARED)


def ratios(num: pd.Series, den: pd.Series) -> pd.Series:
    """Element-wise num / den as float64, NaN where den is 0."""
    return num.astype("float64") / den.astype("float64").where(den != 0)


def total(frame: pd.DataFrame, column: str) -> float:
    """Σ column over the rows (NA skipped)."""
    return float(frame[column].astype("float64").sum())


def count(frame: pd.DataFrame, column: str) -> int:
    """Σ column of an integer count, as an int (NA skipped): counts stay exact and print as integers."""
    return int(frame[column].astype("float64").sum())


def _col(column: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda f: f[column].astype("float64")


@dataclass(frozen=True)
class Metric:
    """One figure of an analysis: per tensor, and over any scope of tensors."""

    name: str
    analysis: AnalysisName
    aggregation: str  # one line: how a scope of tensors becomes one number
    needs: tuple[str, ...]  # per-tensor columns read; a row with NA in any of them is left out
    statuses: frozenset[str]  # structural statuses whose rows enter the metric
    per_tensor: Callable[[pd.DataFrame], pd.Series]
    aggregate: Callable[[pd.DataFrame], float]
    # Rows whose value is a number but not a measurement (e.g. a principal angle of an unstable subspace): they
    # are left out of the scope figure, and ``check`` says so in a note.
    defined: Callable[[pd.DataFrame], pd.Series] | None = None
    undefined_why: str = ""

    def measured(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` that have a value of this metric (right status, no NA in the columns it reads)."""
        ok = frame["status"].isin(self.statuses) & frame[list(self.needs)].notna().all(axis=1)
        return frame[ok]

    def rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` this metric is defined over: measured, and meaningful (see ``defined``)."""
        rows = self.measured(frame)
        return rows[self.defined(rows)] if self.defined is not None and len(rows) else rows

    def left_out(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Measured rows whose value is not meaningful, so not part of the scope figure."""
        rows = self.measured(frame)
        return rows[~self.defined(rows)] if self.defined is not None and len(rows) else rows.iloc[:0]

    def over(self, frame: pd.DataFrame) -> float:
        """The metric over every usable row of ``frame`` (NaN when none is usable)."""
        rows = self.rows(frame)
        return self.aggregate(rows) if len(rows) else math.nan


def _count(name: str, analysis: AnalysisName, statuses: frozenset[str] = FLOAT_COMPARED) -> Metric:
    return Metric(name, analysis, f"Σ{name}", (name,), statuses, _col(name), lambda f: count(f, name))


def _maximum(name: str) -> Metric:
    angle = name.startswith("angle_")
    return Metric(
        name,
        "spectral",
        "maximum over the scope (the worst matrix" + (" whose angles are defined and stable)" if angle else ")"),
        (name,),
        COMPARABLE,
        _col(name),
        lambda f: float(f[name].astype("float64").max()),
        angles_ok if angle else None,
        ANGLES_WHY if angle else "",
    )


# ---------------------------------------------------------------------------------------------
# sparsity (docs/metrics.md §1)


def _sparsity_of(changed: str) -> Callable[[pd.DataFrame], float]:
    return lambda f: 1.0 - ratio(total(f, changed), total(f, "numel"))


SPARSITY: tuple[Metric, ...] = (
    _count("numel", "sparsity"),
    Metric(
        "changed",
        "sparsity",
        "Σchanged (entries, integer tensors included)",
        ("changed",),
        COMPARABLE,
        _col("changed"),
        lambda f: count(f, "changed"),
    ),
    Metric(
        "sparsity",
        "sparsity",
        "1 − Σchanged / Σnumel (parameter-weighted)",
        ("changed", "numel"),
        FLOAT_COMPARED,
        lambda f: 1.0 - ratios(f["changed"], f["numel"]),
        _sparsity_of("changed"),
    ),
    Metric(
        "density",
        "sparsity",
        "Σchanged / Σnumel (parameter-weighted)",
        ("changed", "numel"),
        FLOAT_COMPARED,
        lambda f: ratios(f["changed"], f["numel"]),
        lambda f: ratio(total(f, "changed"), total(f, "numel")),
    ),
    Metric(
        "sparsity_bf16",
        "sparsity",
        "1 − Σchanged_bf16 / Σnumel over the fp32/fp64 tensors (as bf16 would store them)",
        ("changed_bf16", "numel"),
        FLOAT_COMPARED,
        lambda f: 1.0 - ratios(f["changed_bf16"], f["numel"]),
        _sparsity_of("changed_bf16"),
    ),
    *(_count(label, "sparsity") for label in ("ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16")),
    _count("changed_nonfinite", "sparsity"),
    _count("overflow_as", "sparsity"),
)

# ---------------------------------------------------------------------------------------------
# principal-overlap (docs/metrics.md §2, §2b)

# (region, |M• ∩ M| column, |M•| column, per-tensor magnitude-matched baseline column)
REGIONS = (
    ("principal", "changed_principal", "principal_size", "baseline_principal_magnitude"),
    ("low", "changed_low", "low_size", "baseline_low_magnitude"),
    (
        "principal_not_low",
        "changed_principal_not_low",
        "principal_not_low_size",
        "baseline_principal_not_low_magnitude",
    ),
)


def random_expected(frame: pd.DataFrame, size: str) -> pd.Series:
    """Per tensor, the expected |region ∩ update| if the changes fell at random: changed · |region| / numel."""
    return frame["changed"].astype("float64") * ratios(frame[size], frame["numel"])


def magnitude_expected(frame: pd.DataFrame, baseline: str) -> pd.Series:
    """Per tensor, the magnitude-matched expected intersection: baseline overlap · changed (0 where none changed)."""
    changed = frame["changed"].astype("float64")
    return (frame[baseline].astype("float64") * changed).where(changed != 0, 0.0)


def _region_metrics(region: str, count: str, size: str, baseline: str) -> tuple[Metric, ...]:
    def hits(f: pd.DataFrame) -> float:
        return total(f, count)

    def by_random(f: pd.DataFrame) -> float:
        return float(random_expected(f, size).sum())

    def by_magnitude(f: pd.DataFrame) -> float:
        return float(magnitude_expected(f, baseline).sum(skipna=False))

    comparable = COMPARABLE
    return (
        Metric(
            f"overlap_{region}",
            "principal",
            f"Σ{count} / Σchanged (weighted by updated entries)",
            ("changed", count),
            comparable,
            lambda f: ratios(f[count], f["changed"]),
            lambda f: ratio(hits(f), total(f, "changed")),
        ),
        Metric(
            f"baseline_{region}",
            "principal",
            f"Σ(changed·{size}/numel) / Σchanged: the overlap if updates fell at random",
            ("changed", "numel", size),
            comparable,
            lambda f: ratios(random_expected(f, size), f["changed"]),
            lambda f: ratio(by_random(f), total(f, "changed")),
        ),
        Metric(
            f"ratio_{region}",
            "principal",
            f"Σ{count} / Σ(changed·{size}/numel): observed over random-expected intersection",
            ("changed", "numel", size, count),
            comparable,
            lambda f: ratios(f[count], random_expected(f, size)),
            lambda f: ratio(hits(f), by_random(f)),
        ),
        Metric(
            f"baseline_{region}_magnitude",
            "principal",
            f"Σ(changed·{baseline}) / Σchanged: the overlap of updates matched to W0's magnitude bins",
            ("changed",),
            comparable,
            lambda f: ratios(magnitude_expected(f, baseline), f["changed"]),
            lambda f: ratio(by_magnitude(f), total(f, "changed")),
        ),
        Metric(
            f"ratio_{region}_magnitude",
            "principal",
            f"Σ{count} / Σ(changed·{baseline}): observed over magnitude-matched expected intersection",
            ("changed", count),  # the baseline column may be NaN where nothing changed
            comparable,
            lambda f: ratios(f[count], magnitude_expected(f, baseline)),
            lambda f: ratio(hits(f), by_magnitude(f)),
        ),
    )


def _weighted_mean(name: str, weight: str) -> Callable[[pd.DataFrame], float]:
    """Σ(value·weight) / Σweight over the rows with a value and a positive weight."""

    def aggregate(f: pd.DataFrame) -> float:
        w = f[weight].astype("float64")
        ok = f[name].notna() & (w > 0)
        return ratio(float((f[name].astype("float64")[ok] * w[ok]).sum()), float(w[ok].sum()))

    return aggregate


def _energy(name: str) -> Metric:
    return Metric(
        name,
        "principal",
        f"Σ({name}·delta_fro_sq) / Σdelta_fro_sq (weighted by update energy)",
        (name, "delta_fro_sq"),
        COMPARABLE,
        _col(name),
        _weighted_mean(name, "delta_fro_sq"),
    )


PRINCIPAL: tuple[Metric, ...] = (
    _count("numel", "principal", COMPARABLE),
    _count("changed", "principal", COMPARABLE),
    Metric(
        "update_density",
        "principal",
        "Σchanged / Σnumel over the analysed matrices",
        ("changed", "numel"),
        COMPARABLE,
        lambda f: ratios(f["changed"], f["numel"]),
        lambda f: ratio(total(f, "changed"), total(f, "numel")),
    ),
    *(m for spec in REGIONS for m in _region_metrics(*spec)),
    *(_energy(f"energy_{side}{suffix}") for side in ("principal", "left", "right") for suffix in ("", "_random")),
)

# ---------------------------------------------------------------------------------------------
# spectral (docs/metrics.md §3)


def _per_parameter(name: str) -> Metric:
    return Metric(
        name,
        "spectral",
        f"Σ({name}·numel) / Σnumel (mean weighted by parameter count)",
        (name, "numel"),
        COMPARABLE,
        _col(name),
        _weighted_mean(name, "numel"),
    )


# Principal angles between top-k subspaces are a measurement only when the subspaces are well defined. Per matrix
# the spectral analysis's ``angles`` column says: ``ok``; ``trivial_k`` when k = min(m, n) (the top-k subspace of
# the shorter side is the whole space: its angles are 0 by construction, and σ_{k+1} does not exist, so there is
# no gap); ``unstable_gap`` when the Wedin bound arcsin(‖ΔW‖₂ / (σ_k − σ_{k+1})) is at least WEDIN_UNSTABLE_DEG
# (the update is as large as the gap, so the top-k and the next directions can trade places: a large angle says
# the gap is small, not that the subspace turned). Only ``ok`` angles enter the worst-matrix figures, the
# rankings and ``check`` rules.
WEDIN_UNSTABLE_DEG = 45.0
ANGLES_WHY = (
    f"angles undefined (trivial_k: k = min(m, n)) or unstable (unstable_gap: Wedin bound >= {WEDIN_UNSTABLE_DEG:g}°)"
)


def angle_status(k: float, shape: str, wedin_deg: float, delta_2: float) -> str:
    """``ok``, ``trivial_k`` or ``unstable_gap`` for one analysed matrix (see :data:`WEDIN_UNSTABLE_DEG`)."""
    dims = [int(d) for d in str(shape).split("x")]
    if len(dims) == 2 and k >= min(dims):
        return "trivial_k"
    if delta_2 == 0:
        return "ok"  # nothing moved: angles are 0 whatever the gap
    return "ok" if wedin_deg < WEDIN_UNSTABLE_DEG else "unstable_gap"  # NaN (a zero gap) is unstable too


def angles_ok(frame: pd.DataFrame) -> pd.Series:
    """Rows whose principal angles are a measurement (all rows of a frame without an ``angles`` column)."""
    if "angles" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["angles"] == "ok"


SPECTRAL: tuple[Metric, ...] = (
    *(
        _maximum(name)
        for name in (
            "nss",
            "angle_u_max_deg",
            "angle_v_max_deg",
            "angle_u_mean_deg",
            "angle_v_mean_deg",
            "sv_topk_max_rel_change",
            "delta_rel_fro",
            "nss_null_ratio",
            "angle_u_max_null_ratio",
            "angle_v_max_null_ratio",
        )
    ),
    _per_parameter("nss_per_update"),
    _count("intruders", "spectral", COMPARABLE),
    _count("intruders_null", "spectral", COMPARABLE),
)


def figures(frame: pd.DataFrame, metrics: Sequence[Metric]) -> dict[str, float]:
    """Every metric's scope figure over the rows of ``frame`` (the caller picks the population)."""
    return {m.name: m.aggregate(frame) for m in metrics}


def grouped(frame: pd.DataFrame, key: str | list[str], metrics: Sequence[Metric]) -> pd.DataFrame:
    """One row per group of ``key`` (layer, module, ...): each metric's scope figure over the group's rows."""
    return rollup_by(frame, key, lambda group: figures(group, metrics), [m.name for m in metrics])


def scope_key(frame: pd.DataFrame, key: str | list[str]) -> str | list[str]:
    """The grouping of a rollup per ``key`` (layer, module, (layer, module) ...): ``stack`` first when the
    checkpoint has several stacks (a non-empty ``stack`` column), so that encoder block N and decoder block N, or
    vision layer i and text layer i, are never one row; ``key`` itself when it has one."""
    keys = [key] if isinstance(key, str) else list(key)
    if "stack" in frame.columns and "stack" not in keys and bool((frame["stack"].astype(str) != "").any()):
        return ["stack", *keys]
    return key


def rollup_by(
    frame: pd.DataFrame,
    key: str | list[str],
    figures_of: Callable[[pd.DataFrame], dict[str, float]],
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per group of ``key``, its figures from ``figures_of(rows)``; a ``stack`` level sorts in the order
    of :data:`ckptdiff.naming.STACKS` (vision, audio, encoder, projector, decoder, mtp, head), the rest naturally."""
    rows = {name: figures_of(group) for name, group in frame.groupby(key, sort=True)}
    out = pd.DataFrame.from_dict(rows, orient="index")
    if columns is not None:
        out = out.reindex(columns=list(columns))
    counts = [
        c
        for c in out.columns
        if rows and all(isinstance(r.get(c), int) and not isinstance(r.get(c), bool) for r in rows.values())
    ]
    out = out.astype(dict.fromkeys(counts, "int64"))  # counts stay integers (from_dict makes them floats)
    names = [key] if isinstance(key, str) else list(key)
    if len(names) > 1:
        tuples = list(out.index)
        index = pd.MultiIndex.from_tuples(tuples, names=names) if tuples else None
        out.index = index if index is not None else pd.MultiIndex.from_arrays([[]] * len(names), names=names)
    else:
        out.index.names = names
    return in_stack_order(out)


def layer_label(value: object) -> str:
    """A row of a per-layer rollup as words: ``layer 3``, or ``vision layer 3`` for a (stack, layer) row."""
    if isinstance(value, tuple):
        *stack, layer = value
        return " ".join([*(str(s) for s in stack if s), f"layer {int(layer)}"])
    return f"layer {int(value)}"  # type: ignore[call-overload]


def in_stack_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of a rollup with a ``stack`` index level in stack order (a stable sort: within a stack the order stays)."""
    if "stack" not in frame.index.names or frame.empty:
        return frame
    ranks = [stack_rank(str(s)) for s in frame.index.get_level_values("stack")]
    return frame.iloc[sorted(range(len(frame)), key=ranks.__getitem__)]


def pick(metrics: Sequence[Metric], *names: str) -> tuple[Metric, ...]:
    """The named metrics, in the order given."""
    table = by_name(metrics)
    return tuple(table[n] for n in names)


def by_name(metrics: Sequence[Metric]) -> dict[str, Metric]:
    """Metrics keyed by name."""
    return {m.name: m for m in metrics}


# ---------------------------------------------------------------------------------------------
# trajectory (docs/trajectory.md): a run's checkpoints, step over step (k-1 -> k) and cumulative (first -> k)


def _trajectory_sparsity(changed: str, over: str) -> Metric:
    return Metric(
        changed.replace("changed", "sparsity"),
        "trajectory",
        f"1 − Σ{changed} / Σnumel over {over} (parameter-weighted)",
        (changed, "numel"),
        FLOAT_COMPARED,
        lambda f: 1.0 - ratios(f[changed], f["numel"]),
        _sparsity_of(changed),
    )


TRAJECTORY: tuple[Metric, ...] = (
    _count("numel", "trajectory"),
    _count("changed_step", "trajectory"),
    _count("changed_cumulative", "trajectory"),
    _trajectory_sparsity("changed_step", "the float tensors"),
    _trajectory_sparsity("changed_cumulative", "the float tensors"),
    _trajectory_sparsity("changed_step_bf16", "the fp32/fp64 tensors (as bf16 would store them)"),
    _trajectory_sparsity("changed_cumulative_bf16", "the fp32/fp64 tensors (as bf16 would store them)"),
    *(_count(label, "trajectory") for label in ("ulp_1", "ulp_2", "ulp_3_4", "ulp_5_16", "ulp_gt16")),
    _count("patch_bytes", "trajectory"),
)

# What a ``check`` rule can name: every declared metric, each from the analysis that declares it.
GATES: dict[str, Metric] = {
    **by_name([m for m in SPARSITY if m.name != "numel"]),
    **by_name([m for m in PRINCIPAL if m.name not in ("changed", "numel")]),
    **by_name(SPECTRAL),
}
