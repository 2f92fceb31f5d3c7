"""`ckptdiff sparsity`: bf16-aware update masks and update sparsity (docs/metrics.md §1), streamed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ckptdiff.analyses.base import (
    Report,
    Table,
    count,
    digest,
    figures_table,
    item_detail,
    non_finite_detail,
    pair_target,
    rollup_key,
    row_basics,
)
from ckptdiff.analyses.scopes import SPARSITY, by_name, figures, grouped, in_stack_order, pick, scope_key
from ckptdiff.engine.alignment import COMPARABLE, Aligned, Status
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.views.fp8 import FP8_COLUMNS
from ckptdiff.io.views.quant import Stats
from ckptdiff.log import log
from ckptdiff.metrics.mask import CompareMode, compare_mode, dtype_name
from ckptdiff.metrics.sparsity import ULP_LABELS, ChangeCounts, count_changes
from ckptdiff.naming import natural_key

BITWISE_BF16 = CompareMode("bitwise", 0.0, torch.bfloat16)

# Per-tensor CSV columns, in order (documented in README.md).
COLUMNS = [
    "tensor",
    "stack",
    "layer",
    "module",
    "expert",
    "shape",
    "dtype_base",
    "dtype_ft",
    "compared_as",
    "numel",
    "changed",
    "sparsity",
    "changed_bf16",
    "sparsity_bf16",
    *ULP_LABELS,
    "changed_nonfinite",
    "overflow_as",
    *FP8_COLUMNS,
    "linear",
    "status",
    "detail",
]


@dataclass(frozen=True)
class SparsityResult:
    """Per-tensor update counts plus the header that says how they were made."""

    header: dict[str, str]
    rows: list[dict[str, object]] = field(default_factory=list)

    def __repr__(self) -> str:
        o = self.overall()
        return (
            f"<SparsityResult: {len(self.rows)} tensors, sparsity {o['sparsity']:.4f} overall "
            f"({int(o['changed']):,} of {int(o['numel']):,} changed); .to_frame() .overall() .by() .report()>"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per tensor (compared or not), columns as in :data:`COLUMNS`."""
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        counts = [
            "layer",
            "numel",
            "changed",
            "changed_bf16",
            *ULP_LABELS,
            "changed_nonfinite",
            "overflow_as",
            *FP8_COLUMNS,
        ]
        return df.astype({c: "Int64" for c in counts})

    def compared(self) -> pd.DataFrame:
        """Float tensors whose entries were compared: the population every sparsity figure is over."""
        df = self.to_frame()
        return df[df["status"].isin([s.value for s in COMPARABLE]) & (df["status"] != Status.NON_FLOAT.value)]

    def _sum(self, df: pd.DataFrame) -> dict[str, float]:
        out = {"tensors": len(df), **figures(df, pick(SPARSITY, "numel", "changed", "sparsity"))}
        bf16 = by_name(SPARSITY)["sparsity_bf16"]
        wide = bf16.rows(df)  # only fp32/fp64 tensors have a bf16 view
        if len(wide):
            out["sparsity_bf16"] = bf16.over(df)
            if len(wide) < len(df):  # mixed dtypes: the native figure over the same tensors, to compare like with like
                out["tensors_fp32"] = len(wide)
                out["sparsity_fp32"] = by_name(SPARSITY)["sparsity"].over(wide)
        out.update(figures(df, pick(SPARSITY, *ULP_LABELS)))
        return out

    def overall(self) -> dict[str, float]:
        """Parameter-weighted totals over every compared float tensor."""
        return self._sum(self.compared())

    def linear_only(self) -> dict[str, float]:
        """Parameter-weighted totals over 2-D matrices inside transformer blocks."""
        df = self.compared()
        return self._sum(df[df["linear"].astype(bool)])

    def by(self, key: str) -> pd.DataFrame:
        """Parameter-weighted rollup per ``layer``, ``module`` or ``expert``: numel, changed, sparsity.

        ``layer`` and ``module`` are per (stack, layer) and (stack, module) when the checkpoint has several stacks
        (see :func:`ckptdiff.analyses.scopes.scope_key`).

        ``expert`` groups the tensors of each routed expert index (over every layer) and the shared experts
        (``shared``), in natural order; tensors outside the experts are left out.
        """
        df = self.compared()
        if rollup_key(key, ("layer", "module", "expert")) == "layer":
            df = df.dropna(subset=["layer"])
        if key == "expert":
            df = df[df["expert"] != ""]
            if df.empty:
                log.warning("by('expert'): no tensor belongs to an expert (a dense model): the rollup is empty")
                return pd.DataFrame(columns=["numel", "changed", "sparsity"]).rename_axis("expert")
        out = grouped(
            df, key if key == "expert" else scope_key(df, key), pick(SPARSITY, "numel", "changed", "sparsity")
        )
        if key == "expert":
            out = out.loc[sorted(out.index, key=natural_key)]
        return out.astype({"numel": "int64", "changed": "int64"})

    def expert_grid(self) -> pd.DataFrame:
        """Experts x module sparsity over every layer, parameter-weighted within each cell (empty without experts)."""
        df = self.compared()
        df = df[df["expert"] != ""]
        if df.empty:
            return pd.DataFrame()
        grid = grouped(df, ["expert", "module"], pick(SPARSITY, "sparsity"))["sparsity"].unstack("module")
        return grid.loc[sorted(grid.index, key=natural_key)]

    def top_experts(self, n: int = 10) -> pd.DataFrame:
        """The (layer, expert) pairs that moved most: highest density (changed / numel) first, ties by changed."""
        df = self.compared()
        df = df[df["expert"] != ""]
        if df.empty:
            return pd.DataFrame()
        df = df.dropna(subset=["layer"])
        out = grouped(df, scope_key(df, ["layer", "expert"]), pick(SPARSITY, "numel", "changed", "sparsity"))
        out["density"] = 1.0 - out["sparsity"]
        out = out.astype({"numel": "int64", "changed": "int64"}).sort_values(
            ["density", "changed"], ascending=False, kind="stable"
        )
        return out.head(n)

    def grid(self) -> pd.DataFrame:
        """Layer x module sparsity of the linear matrices, parameter-weighted within each cell; rows per (stack,
        layer) when the checkpoint has several stacks."""
        df = self.compared()
        df = df[df["linear"].astype(bool)]
        if df.empty:
            return pd.DataFrame()
        grid = grouped(df, scope_key(df, ["layer", "module"]), pick(SPARSITY, "sparsity"))["sparsity"].unstack("module")
        return in_stack_order(grid)

    def structural(self) -> pd.DataFrame:
        """Tensors that were not compared one to one, or that carry a structural note."""
        df = self.to_frame()
        mask = (df["status"] != "ok") | (df["detail"] != "")
        return df.loc[mask, ["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape", "changed"]]

    def report(self) -> Report:
        """The report the CLI renders."""
        o = self.overall()
        lin = self.linear_only()
        linear = (
            f"linear layers only {lin['sparsity']:.4f}"
            if lin["tensors"]
            else "no linear layer among them (2-D matrices in the blocks)"
        )
        if o["tensors"]:
            summary = [
                f"Update sparsity (fraction of entries unchanged) {o['sparsity']:.4f} overall "
                f"({int(o['changed']):,} of {int(o['numel']):,} entries changed, "
                f"{count(int(o['tensors']), 'tensor')}); {linear}.",
            ]
        else:
            summary = ["No floating-point tensor was compared, so there is no update sparsity to report."]
        if "sparsity_fp32" in o:  # mixed dtypes: bf16's figure is over the fp32/fp64 tensors only, and so is this one
            summary.append(
                f"As bf16 would store them, sparsity {o['sparsity_bf16']:.4f} over the "
                f"{count(int(o['tensors_fp32']), 'fp32/fp64 tensor')}, against {o['sparsity_fp32']:.4f} natively "
                "over the same: the gap is what bf16 rounding hides (PNT's precision gate); the other tensors have "
                "no bf16 view."
            )
        elif "sparsity_bf16" in o:
            summary.append(
                f"As bf16 would store them, sparsity {o['sparsity_bf16']:.4f}: the gap to the native "
                f"{o['sparsity']:.4f} is what bf16 rounding hides (PNT's precision gate)."
            )
        if o["changed"]:
            share1 = o["ulp_1"] / o["changed"]
            summary.append(f"{share1:.1%} of changed entries moved by exactly 1 ULP of the compared dtype.")
        over = int(self.compared()["overflow_as"].astype("float64").sum())
        if over:
            summary.append(
                f"{over:,} entries lie beyond the range of the --as dtype ({self.header.get('comparison', '')}): "
                "they round to ±inf, so they are counted as changed whenever their stored values differ "
                "(column overflow_as); compare without --as, or --as fp32, to measure them."
            )
        findings, notes = self._findings()
        summary += notes
        overall = figures_table({"overall": o, "linear layers": lin})
        grid = self.grid()
        per_layer = self.by("layer")
        if not grid.empty:  # every layer on one line: the layer's sparsity over all its tensors, then per module
            grid.insert(0, "all", per_layer["sparsity"].reindex(grid.index))
        tables = [
            Table("Overall (parameter-weighted)", overall),
            Table("Per module type", self.by("module")),
            Table("Per layer", per_layer, terminal=grid.empty),
            Table(
                "Sparsity, layer x module (linear matrices)",
                grid,
                "all: every tensor of the layer (norms included); the modules: its linear matrices.",
            ),
        ]
        if (self.compared()["expert"] != "").any():
            tables += [
                Table("Sparsity, expert x module (every layer)", self.expert_grid()),
                Table("Experts that moved most (layer, expert; highest density first)", self.top_experts()),
            ]
        tensors = self.to_frame()
        return Report("ckptdiff sparsity", self.header, summary, tables, tensors, findings)

    def _findings(self) -> tuple[pd.DataFrame, list[str]]:
        """The structural rows worth listing, and one line each for integer tensors and a model-wide dtype change."""
        df = self.to_frame()
        is_int = df["status"] == Status.NON_FLOAT.value
        found, lines = digest(df, None, pd.Series("", index=df.index))  # the rule every command shares
        ints = df[is_int]
        if len(ints):
            moved = ints[ints["changed"].fillna(0) > 0]["tensor"].astype(str).tolist()
            which = "none changed" if not moved else f"changed: {', '.join(moved[:3])}" + " ..." * (len(moved) > 3)
            lines.append(f"{count(len(ints), 'integer/bool tensor')} compared exactly ({which}).")
        return found[["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape", "changed"]], lines


def _row(item_row: dict[str, object], counts: ChangeCounts | None, bf16: ChangeCounts | None, as_: str) -> dict:
    row = dict(item_row)
    row["compared_as"] = as_
    if counts is None:
        row.update({c: float("nan") for c in ("changed", "sparsity", "changed_bf16", "sparsity_bf16")})
        row.update({c: float("nan") for c in (*ULP_LABELS, "changed_nonfinite", "overflow_as", *FP8_COLUMNS)})
        return row
    row.update(
        changed=counts.changed,
        sparsity=counts.sparsity,
        changed_bf16=bf16.changed if bf16 else float("nan"),
        sparsity_bf16=bf16.sparsity if bf16 else float("nan"),
        changed_nonfinite=counts.changed_nonfinite,
        overflow_as=counts.overflow_as,
        **{label: getattr(counts, label) for label in ULP_LABELS},
    )
    return row


class SparsityAnalysis(Analysis):
    """Update masks counted chunk by chunk for every comparable tensor of one base/fine-tune pair."""

    name = "sparsity"
    state_fields = ("totals", "totals_bf16")

    def __init__(self, mode: CompareMode = CompareMode(), sides: Sequence[int] = (0, 1)) -> None:
        super().__init__(sides)
        self.mode = mode
        self.totals: dict[str, ChangeCounts] = {}
        self.totals_bf16: dict[str, ChangeCounts] = {}
        self.items: list[Aligned] = []
        self.targets: dict[str, torch.dtype] = {}
        self.fp8: Stats | None = None  # code / scale changes of quantized and block-scaled FP8 weights

    def form(self, item: Aligned) -> Form | None:
        return Form.CHUNKS if item.comparable else None

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)
        self.targets = {it.name: pair_target(it, self.mode.as_dtype) for it in items if it.comparable and it.is_float}
        base, ft = (run.sources[k] for k in self.sides)
        self.fp8 = Stats.for_pair(base, ft)

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        w0, w1 = tensors
        name = item.name
        self.totals[name] = self.totals.get(name, ChangeCounts()) + count_changes(w0, w1, self.mode)
        # fp32 storage: also report what bf16 would keep (only when comparing natively, without --as).
        if self.targets.get(name) in (torch.float32, torch.float64):
            extra = count_changes(w0, w1, BITWISE_BF16)
            self.totals_bf16[name] = self.totals_bf16.get(name, ChangeCounts()) + extra
        if self.fp8 is not None:
            self.fp8.add(item, start, w0.numel())

    def state(self) -> dict[str, Any]:
        state = super().state()
        if self.fp8 is not None:  # FP8 code and scale-block counts, per tensor, travel with the totals
            state["fp8"] = (self.fp8.codes, self.fp8.blocks)
        return state

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        for state in states:
            codes_blocks = state.pop("fp8", None)
            if codes_blocks is not None and self.fp8 is not None:
                self.fp8.codes.update(codes_blocks[0])
                self.fp8.blocks.update(codes_blocks[1])
        super().merge(states)

    def abort(self) -> None:
        if self.fp8 is not None:
            self.fp8.close()

    def finish(self, run: Run) -> SparsityResult:
        if self.fp8 is not None:
            self.fp8.close()
        rows = []
        for it in self.items:
            basics = row_basics(it)
            basics["detail"] = item_detail(it)
            as_ = ""
            if it.comparable and it.is_float:
                as_ = dtype_name(self.targets[it.name])
            elif it.comparable:
                as_ = "exact"
            counts = self.totals.get(it.name) if it.comparable else None
            if it.comparable and counts is None:  # zero-size tensor
                counts = ChangeCounts()
            row = _row(basics, counts, self.totals_bf16.get(it.name), as_)
            if counts is not None and counts.changed_nonfinite:  # a NaN is a finding, as in every command
                n = counts.changed_nonfinite
                why = "a NaN" + " or overflow the --as dtype" * bool(counts.overflow_as)
                note = non_finite_detail(
                    consequence=f"{n:,} changed {'entry involves' if n == 1 else 'entries involve'} {why}"
                )
                row["detail"] = "; ".join(d for d in (row["detail"], note) if d)
            if counts is not None:
                fp8 = self.fp8.columns(it) if self.fp8 is not None else dict.fromkeys(FP8_COLUMNS, float("nan"))
                row.update(fp8)
            rows.append(row)
        return SparsityResult(run.header("sparsity", self.sides, self.mode), rows)


def sparsity(
    base: SourceLike,
    ft: SourceLike,
    *,
    mode: CompareMode | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    merged_dtype: torch.dtype | str | None = None,
) -> SparsityResult:
    """Update sparsity of ``ft`` relative to ``base``, streamed tensor by tensor (chunked within tensors).

    ``ft`` may be a PEFT adapter, merged into ``base`` with its merged weights stored as ``merged_dtype`` (the
    base's dtype by default; :mod:`ckptdiff.io.views.lora`).
    """
    mode = compare_mode(mode, rtol=rtol, atol=atol, as_dtype=as_dtype)
    opts = {
        "include": include,
        "exclude": exclude,
        "device": device,
        "progress": progress,
        "merged_dtype": merged_dtype,
    }
    return run_pair(base, ft, SparsityAnalysis(mode), label="comparing", **opts)  # type: ignore[no-any-return]
