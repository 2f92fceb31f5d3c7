"""`ckptdiff trajectory`: a training run's checkpoints over time (docs/trajectory.md), in one read of each.

Every checkpoint of the run is a side of one plug-in. The pipeline hands it each tensor as flat chunks of every
checkpoint at once, and for each step k it counts, with the same masks and ULP buckets as ``sparsity``
(:func:`ckptdiff.metrics.sparsity.count_changes`):

- step over step: checkpoint k-1 against checkpoint k;
- cumulative: the first checkpoint against checkpoint k;
- for fp32/fp64 tensors, both again as bf16 would store them;
- the bytes a sparse patch from k-1 to k would take (:func:`ckptdiff.metrics.patch.patch_cost`).

Counts add up over chunks, so memory is a few chunks per checkpoint whatever the tensor size, and the chunk size
shrinks as checkpoints are added (:func:`trajectory`), so the bytes in flight stay flat in their number.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ckptdiff import choices
from ckptdiff.analyses.base import Report, Table, count, digest, item_detail, once_per_key, row_basics
from ckptdiff.analyses.principal import PrincipalAnalysis
from ckptdiff.analyses.scopes import FLOAT_COMPARED, TRAJECTORY, figures, grouped, in_stack_order, pick, scope_key
from ckptdiff.analyses.spectral import SpectralAnalysis
from ckptdiff.engine.alignment import Aligned
from ckptdiff.engine.header import header
from ckptdiff.engine.pipeline import Analysis, Form, Run, execute, open_run
from ckptdiff.engine.reader import CHUNK_BYTES
from ckptdiff.errors import InputError
from ckptdiff.io import layout
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.metrics.mask import CompareMode, compare_mode, comparison_dtype, dtype_name
from ckptdiff.metrics.patch import patch_cost
from ckptdiff.metrics.sparsity import ULP_LABELS, ChangeCounts, count_changes
from ckptdiff.naming import stack_rank

BITWISE_BF16 = CompareMode("bitwise", 0.0, torch.bfloat16)
EXACT = CompareMode()  # what a patch must reproduce: the stored bits
MIN_CHUNK_BYTES = 1 << 20  # per checkpoint: below this, reads get slow for no memory worth saving

# Per-tensor CSV (tensors.csv of a trajectory report), one row per tensor and step, in order.
COLUMNS = [
    "step",
    "tensor",
    "stack",
    "layer",
    "module",
    "expert",
    "shape",
    "dtype",
    "compared_as",
    "numel",
    "changed_step",
    "sparsity_step",
    "changed_cumulative",
    "sparsity_cumulative",
    "changed_step_bf16",
    "sparsity_step_bf16",
    "changed_cumulative_bf16",
    "sparsity_cumulative_bf16",
    *ULP_LABELS,
    "changed_nonfinite",
    "patch_bytes",
    "linear",
    "status",
    "detail",
]
# steps.csv: one row per step and scope (overall, then each module type).
STEP_COLUMNS = [
    "step",
    "from_step",
    "scope",
    "stack",
    "tensors",
    "numel",
    "changed_step",
    "changed_cumulative",
    "sparsity_step",
    "sparsity_cumulative",
    "sparsity_step_bf16",
    "sparsity_cumulative_bf16",
    *ULP_LABELS,
    "patch_bytes",
]
# With ``with_=("principal", ...)`` / ``("spectral", ...)``: first -> k figures per step and scope, appended.
WITH_COLUMNS = {
    "principal": ["ratio_principal", "ratio_principal_magnitude"],
    "spectral": ["nss_median", "nss_max", "nss_per_update"],
}
WITH = tuple(WITH_COLUMNS)
_COUNTS = [
    "step",
    "layer",
    "numel",
    "changed_step",
    "changed_cumulative",
    "changed_step_bf16",
    "changed_cumulative_bf16",
    *ULP_LABELS,
    "changed_nonfinite",
    "patch_bytes",
]
_FIGURES = pick(TRAJECTORY, "numel", "changed_step", "changed_cumulative", "sparsity_step", "sparsity_cumulative")
_BF16 = pick(TRAJECTORY, "sparsity_step_bf16", "sparsity_cumulative_bf16")
_TAIL = pick(TRAJECTORY, *ULP_LABELS, "patch_bytes")


@dataclass(frozen=True)
class TrajectoryResult:
    """Per tensor and step: step-over-step and cumulative counts; the header says how they were made."""

    header: dict[str, str]
    steps: tuple[int, ...]  # one per checkpoint; the first is the reference of the cumulative figures
    checkpoints: tuple[str, ...]  # the inputs, in run order
    rows: list[dict[str, object]] = field(default_factory=list)
    # with_: step -> the first -> k result of principal-overlap / spectral (``PrincipalOverlapResult``, ...)
    principal: dict[int, Any] = field(default_factory=dict)
    spectral: dict[int, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        s = self.steps_frame()
        o = s[s["scope"] == "overall"]
        last = o.iloc[-1] if len(o) else None
        tail = (
            f", cumulative sparsity {last['sparsity_cumulative']:.4f} at step {int(last['step'])}"
            if last is not None
            else ""
        )
        return (
            f"<TrajectoryResult: {len(self.checkpoints)} checkpoints, steps {self.steps[0]}..{self.steps[-1]}{tail}; "
            ".to_frame() .steps_frame() .by() .report()>"
        )

    @once_per_key
    def to_frame(self) -> pd.DataFrame:
        """One row per tensor and step after the first (compared or not), columns as in :data:`COLUMNS`."""
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        return df.astype({c: "Int64" for c in _COUNTS})

    def compared(self) -> pd.DataFrame:
        """Rows of float tensors whose entries were compared: the population of every scope figure."""
        df = self.to_frame()
        return df[df["status"].isin(FLOAT_COMPARED)]

    def _scope(self, df: pd.DataFrame) -> dict[str, float]:
        out: dict[str, float] = {"tensors": len(df), **figures(df, _FIGURES)}
        for m in _BF16:
            out[m.name] = m.over(df)
        out.update(figures(df, _TAIL))
        return out

    @once_per_key
    def steps_frame(self) -> pd.DataFrame:
        """steps.csv: per step, the overall figures then one row per module type (columns :data:`STEP_COLUMNS`)."""
        df = self.compared()
        keys = scope_key(df, "module")  # (stack, module) on a checkpoint with several stacks
        rows = []
        for before, step in itertools.pairwise(self.steps):
            at = df[df["step"] == step]
            rows.append({"step": step, "from_step": before, "scope": "overall", "stack": "", **self._scope(at)})
            for name, group in sorted(at.groupby(keys), key=lambda g: _scope_order(g[0])):
                stack, module = name if isinstance(name, tuple) else ("", name)
                row = {"step": step, "from_step": before, "scope": str(module), "stack": str(stack)}
                rows.append({**row, **self._scope(group)})
        out = pd.DataFrame(rows, columns=STEP_COLUMNS)
        ints = [
            "step",
            "from_step",
            "tensors",
            "numel",
            "changed_step",
            "changed_cumulative",
            *ULP_LABELS,
            "patch_bytes",
        ]
        out = out.astype({c: "int64" for c in ints})
        for key, results in (("principal", self.principal), ("spectral", self.spectral)):
            if results:
                for col in WITH_COLUMNS[key]:
                    scopes = zip(out["step"], out["stack"], out["scope"], strict=True)
                    out[col] = [_with_figure(results.get(int(st)), str(sk), str(sc), col) for st, sk, sc in scopes]
        return out

    def overall(self) -> pd.DataFrame:
        """The overall row of every step, indexed by step."""
        s = self.steps_frame()
        return s[s["scope"] == "overall"].drop(columns="scope").set_index("step")

    @once_per_key
    def by(self, key: str, figure: str = "sparsity_step") -> pd.DataFrame:
        """``figure`` (a trajectory metric) per ``key`` (``module`` or ``layer``) and step: keys down, steps across."""
        df = self.compared()
        if key == "layer":
            df = df.dropna(subset=["layer"])
        if df.empty:
            return pd.DataFrame()
        keys = scope_key(df, key)
        keys = [keys] if isinstance(keys, str) else keys
        return in_stack_order(grouped(df, [*keys, "step"], pick(TRAJECTORY, figure))[figure].unstack("step"))

    def report(self) -> Report:
        """The report the CLI renders."""
        o = self.overall()
        first, last = self.steps[0], self.steps[-1]
        summary = [
            f"{len(self.checkpoints)} checkpoints, steps {first} to {last}; each step is compared with the one "
            f"before it (step over step) and with step {first} (cumulative)."
        ]
        if len(o):
            sp = o["sparsity_step"]
            lo, hi = int(sp.idxmin()), int(sp.idxmax())  # type: ignore[call-overload]
            summary.append(
                f"Step-over-step update sparsity ranges from {sp.loc[lo]:.4f} (step {lo}: {1 - sp.loc[lo]:.2%} of "
                f"entries changed) to {sp.loc[hi]:.4f} (step {hi}); cumulative sparsity at step {last} is "
                f"{o['sparsity_cumulative'].iloc[-1]:.4f}."
            )
            bf16 = o["sparsity_step_bf16"].dropna()
            if len(bf16):
                summary.append(
                    f"As bf16 would store the fp32 weights, step-over-step sparsity ranges from {bf16.min():.4f} to "
                    f"{bf16.max():.4f}: the gap to the native figures is what bf16 rounding hides."
                )
            changed = o["changed_step"].sum()
            if changed:
                summary.append(
                    f"{o['ulp_1'].sum() / changed:.1%} of step-over-step changes moved by exactly 1 ULP of the "
                    "compared dtype."
                )
            total = int(o["patch_bytes"].sum())
            summary.append(
                f"Sparse patches for every step would take {_size(total)} in all "
                f"(largest: {_size(int(o['patch_bytes'].max()))} at step {o['patch_bytes'].idxmax()})."
            )
        if self.principal:
            last_p = self.principal[last].overall()
            summary.append(
                f"From step {first} to step {last}, the update's overlap with the principal weights is "
                f"{last_p['ratio_principal']:.3f}x its random baseline and {last_p['ratio_principal_magnitude']:.3f}x "
                "its magnitude-matched baseline (principal-overlap, per step in steps.csv)."
            )
        if self.spectral:
            last_s = self.spectral[last].overall()
            summary.append(
                f"NSS from step {first} to step {last}: median {last_s['nss_median']:.3g} over the matrices, "
                f"largest {last_s['nss_max']:.3g} (spectral, per step in steps.csv)."
            )
        findings, notes = self._findings()
        summary += notes
        view = {
            "from_step": "from",
            "changed_step": "changed",
            "sparsity_step": "step sparsity",
            "sparsity_cumulative": "cumulative",
            "sparsity_step_bf16": "step (bf16)",
            "patch_bytes": "patch bytes",
        }
        legend = f"from: the checkpoint before; cumulative: from step {first}"
        if len(o) and o["sparsity_step_bf16"].notna().any():
            legend += "; bf16: the fp32 tensors as bf16 would store them."
        else:
            del view["sparsity_step_bf16"]
            legend += "."
        tables = [
            Table(
                "Per step (overall)",
                o,
                view=view,
                legend=legend,
            ),
            Table("Step-over-step sparsity per module type", self.by("module"), terminal=False),
            Table("Cumulative sparsity per module type", self.by("module", "sparsity_cumulative"), terminal=False),
            Table("Step-over-step sparsity per layer", self.by("layer"), terminal=False),
        ]
        return Report("ckptdiff trajectory", self.header, summary, tables, self.to_frame(), findings)

    def _findings(self) -> tuple[pd.DataFrame, list[str]]:
        df = self.to_frame()
        df = df[df["step"] == self.steps[1]] if len(self.steps) > 1 else df
        listed = (df["status"] != "ok") & (df["status"] != "non_float") | (df["detail"] != "")
        found, lines = digest(df, listed, pd.Series("", index=df.index))
        ints = df[df["status"] == "non_float"]
        if len(ints):
            lines.append(f"{count(len(ints), 'integer/bool tensor')} compared exactly, left out of the figures.")
        return found[["tensor", "status", "detail", "shape"]], lines


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _with_figure(result: Any, stack: str, scope: str, column: str) -> float:
    """One first -> k figure of principal-overlap or spectral for a scope (``overall`` or a module type, of
    ``stack`` on a checkpoint with several stacks)."""
    if result is None:
        return math.nan
    if scope == "overall":
        return float(result.overall().get(column, math.nan))
    by = result.by("module")
    row = (stack, scope) if stack else scope
    return float(by.loc[row, column]) if row in by.index and column in by.columns else math.nan


def _scope_order(name: object) -> tuple[int, str]:
    """steps.csv's module rows: stacks as data flows (vision ... decoder ... head), then module names."""
    if isinstance(name, tuple):
        return stack_rank(str(name[0])), str(name[1])
    return 0, str(name)


class TrajectoryAnalysis(Analysis):
    """Step-over-step and cumulative change counts of every tensor across all of a run's checkpoints at once."""

    name = "trajectory"
    state_fields = ("step", "cumulative", "step_bf16", "cumulative_bf16", "exact")

    def __init__(self, steps: Sequence[int], mode: CompareMode = EXACT) -> None:
        super().__init__(range(len(steps)))
        if len(steps) < 2:
            raise InputError("trajectory needs at least 2 checkpoints of a run; pass them in order, or a folder")
        self.steps = tuple(steps)
        self.mode = mode
        # tensor name -> one ChangeCounts per step after the first
        self.step: dict[str, list[ChangeCounts]] = {}
        self.cumulative: dict[str, list[ChangeCounts]] = {}
        self.step_bf16: dict[str, list[ChangeCounts]] = {}
        self.cumulative_bf16: dict[str, list[ChangeCounts]] = {}
        self.exact: dict[str, list[int]] = {}  # bitwise changed counts (for the patch) when the mode is not bitwise
        self.items: list[Aligned] = []

    def form(self, item: Aligned) -> Form | None:
        return Form.CHUNKS if item.comparable else None

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        name = item.name
        n = len(tensors) - 1
        zero = [ChangeCounts()] * n
        step = self.step.setdefault(name, list(zero))
        cum = self.cumulative.setdefault(name, list(zero))
        bf16 = item.is_float and self.mode.as_dtype is None
        for k in range(1, n + 1):
            a, b = tensors[k - 1], tensors[k]
            here = count_changes(a, b, self.mode)
            step[k - 1] += here
            cum[k - 1] += here if k == 1 else count_changes(tensors[0], b, self.mode)
            if self.mode != EXACT:
                exact = self.exact.setdefault(name, [0] * n)
                exact[k - 1] += count_changes(a, b).changed
            if bf16 and comparison_dtype(a.dtype, b.dtype) in (torch.float32, torch.float64):
                s16 = self.step_bf16.setdefault(name, list(zero))
                c16 = self.cumulative_bf16.setdefault(name, list(zero))
                here16 = count_changes(a, b, BITWISE_BF16)
                s16[k - 1] += here16
                c16[k - 1] += here16 if k == 1 else count_changes(tensors[0], b, BITWISE_BF16)

    def finish(self, run: Run) -> TrajectoryResult:
        rows: list[dict[str, object]] = []
        nan = float("nan")
        for k in range(1, len(self.steps)):
            for it in self.items:
                info = it.infos[k]
                row = row_basics(it)
                row.pop("dtype_base")
                row.pop("dtype_ft")
                row["step"] = self.steps[k]
                row["dtype"] = info.dtype.short if info is not None else ""
                row["detail"] = item_detail(it)
                prev = it.infos[k - 1]
                if it.comparable and info is not None and prev is not None:
                    row["compared_as"] = (
                        dtype_name(comparison_dtype(prev.dtype.torch, info.dtype.torch, self.mode.as_dtype))
                        if it.is_float
                        else "exact"
                    )
                    none = ChangeCounts(numel=info.numel)
                    st = self.step.get(it.name, [none] * len(self.steps))[k - 1]
                    cu = self.cumulative.get(it.name, [none] * len(self.steps))[k - 1]
                    b_st = self.step_bf16.get(it.name)
                    b_cu = self.cumulative_bf16.get(it.name)
                    exact = self.exact[it.name][k - 1] if it.name in self.exact else st.changed
                    if prev.dtype.name != info.dtype.name:  # a dtype change: the whole tensor is the patch
                        patch = info.nbytes
                    else:
                        patch = patch_cost(info.numel, exact, info.dtype.itemsize).bytes
                    row.update(
                        changed_step=st.changed,
                        sparsity_step=st.sparsity,
                        changed_cumulative=cu.changed,
                        sparsity_cumulative=cu.sparsity,
                        changed_step_bf16=b_st[k - 1].changed if b_st else nan,
                        sparsity_step_bf16=b_st[k - 1].sparsity if b_st else nan,
                        changed_cumulative_bf16=b_cu[k - 1].changed if b_cu else nan,
                        sparsity_cumulative_bf16=b_cu[k - 1].sparsity if b_cu else nan,
                        changed_nonfinite=st.changed_nonfinite,
                        patch_bytes=patch,
                        **{label: getattr(st, label) for label in ULP_LABELS},
                    )
                else:
                    row["compared_as"] = ""
                rows.append(row)
        params: dict[str, object] = {"steps": ", ".join(map(str, self.steps))}
        for key, globs in run.filters.items():
            if globs:
                params[key] = ", ".join(globs)
        roles = [f"step {s}" for s in self.steps]
        head = header("trajectory", run.sources, roles, run.device, self.mode, **params)
        return TrajectoryResult(head, self.steps, tuple(s.spec for s in run.sources), rows)


def trajectory(
    checkpoints: SourceLike | Sequence[SourceLike],
    *,
    steps: Sequence[int] | None = None,
    mode: CompareMode | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    with_: Sequence[str] = (),
    k: int = choices.DEFAULT_K,
    alpha: float = 0.5,
    svd: str = "auto",
    device: str = "auto",
    batch_budget: float | None = None,
    progress: bool = True,
) -> TrajectoryResult:
    """A run's checkpoints over time: step-over-step and cumulative update sparsity, one read of each checkpoint.

    ``checkpoints`` are paths, Hub ids or open sources in run order; a single path or glob may also be a folder of
    step-numbered checkpoints (``checkpoint-N``, ``global_step_N/actor/huggingface``, ...), expanded and sorted
    numerically. ``steps`` (one per checkpoint) defaults to the numbers in the names (else the positions).

    ``with_`` adds, per step, first -> k figures of ``principal`` (principal-overlap with ``k``, ``alpha``, ``svd``)
    and ``spectral`` (NSS): those read every matrix whole, on every checkpoint at once, so memory is no longer flat
    in the number of checkpoints.
    """
    mode = compare_mode(mode, rtol=rtol, atol=atol, as_dtype=as_dtype)
    single = isinstance(checkpoints, (str, os.PathLike, Source))
    specs: list[SourceLike] = [checkpoints] if single else list(checkpoints)  # type: ignore[list-item,arg-type]
    if steps is None and all(isinstance(s, (str, os.PathLike)) for s in specs):
        expanded = layout.run_checkpoints([str(s) for s in specs])
        specs = [p for p, _ in expanded]
        steps = [n for _, n in expanded]
    if steps is None:
        steps = list(range(len(specs)))
    if len(steps) != len(specs):
        raise InputError(f"trajectory: {len(steps)} step numbers for {len(specs)} checkpoints; give one per checkpoint")
    wide = next((s for s in steps if not -(2**63) <= s < 2**63), None)
    if wide is not None:  # the step columns are 64-bit integers
        raise InputError(
            f"trajectory: step {wide} does not fit in 64 bits; rename that checkpoint (its name gives the step) or "
            "give smaller step numbers"
        )
    twice = next((s for i, s in enumerate(steps) if s in steps[:i]), None)
    if twice is not None:  # rows and figures are keyed by step: two checkpoints of one step would be added together
        raise InputError(f"trajectory: step {twice} is given twice; give each checkpoint its own step number")
    unknown = [w for w in with_ if w not in WITH]
    if unknown:
        raise InputError(f"--with: unknown analysis {unknown[0]!r}; choose from {', '.join(WITH)}")
    plugin = TrajectoryAnalysis(steps, mode)
    extras: list[tuple[str, int, Analysis]] = []
    for r in range(1, len(steps)):
        if "principal" in with_:
            extras.append(("principal", r, PrincipalAnalysis(k=k, alpha=alpha, svd=svd, mode=mode, sides=(0, r))))
        if "spectral" in with_:
            extras.append(("spectral", r, SpectralAnalysis(k=k, as_dtype=mode.as_dtype, sides=(0, r))))
    labels = [f"step {s}" for s in steps]
    opts: dict[str, Any] = {"include": include, "exclude": exclude, "device": device, "batch_budget": batch_budget}
    with open_run(specs, labels=labels, progress=progress, **opts) as run:
        # Every checkpoint's chunk is in memory at once: their total stays about 2 x CHUNK_BYTES, whatever their number.
        run = dataclasses.replace(run, chunk_bytes=max(MIN_CHUNK_BYTES, 2 * CHUNK_BYTES // len(specs)))
        result, *more = execute(run, [plugin, *(a for _, _, a in extras)], progress, "trajectory")
    if extras:
        found: dict[str, dict[int, Any]] = {"principal": {}, "spectral": {}}
        for (key, r, _), res in zip(extras, more, strict=True):
            found[key][steps[r]] = res
        head = dict(result.header)
        head["with"] = ", ".join(w for w in WITH if w in with_)
        head["k"], head["alpha"], head["svd"] = str(k), str(alpha), svd
        result = dataclasses.replace(result, header=head, principal=found["principal"], spectral=found["spectral"])
    return result  # type: ignore[no-any-return]
