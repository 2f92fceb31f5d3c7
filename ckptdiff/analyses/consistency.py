"""`ckptdiff consistency`: do several fine-tunes of one base change the same entries? (docs/metrics.md §4, §2b).

The base and every fine-tune are streamed together, one aligned tensor per checkpoint at a time. Each run's
update mask (same modes as ``sparsity``), its delta signs and the base's exponent bins are reduced on the
device to raw counts (:class:`~ckptdiff.metrics.consistency.Consistency`); only those counts are kept, so
every rollup (module type, layer, linear layers, overall) is exact: counts are summed, ratios derived last.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ckptdiff.analyses.base import Report, Table, count, digest, figures_table, item_detail, rollup_key
from ckptdiff.engine.alignment import Aligned, Status
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_analyses
from ckptdiff.errors import InputError, option
from ckptdiff.io import layout
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.io.views import fp8
from ckptdiff.metrics.consistency import Consistency, PairCounts, combine, consistency_from_masks, delta_sign
from ckptdiff.metrics.mask import (
    CompareMode,
    compare_mode,
    comparison_dtype,
    dtype_name,
    exponent_bins,
    update_mask,
    widen_fp8,
)
from ckptdiff.metrics.numeric import AGREEMENT_BAND, against_one, ratio
from ckptdiff.naming import expert_of, is_linear, layer_of, module_of, stack_rank

# Per-(tensor, pair) CSV columns, in order.
COLUMNS = [
    "tensor",
    "stack",
    "layer",
    "module",
    "expert",
    "shape",
    "numel",
    "linear",
    "run_a",
    "run_b",
    "dtype_base",
    "dtype_a",
    "dtype_b",
    "compared_as",
    "n_a",
    "n_b",
    "n_both",
    "n_union",
    "density_a",
    "density_b",
    "jaccard",
    "jaccard_random",
    "jaccard_magnitude",
    "expected_random",
    "expected_magnitude",
    "overlap_a",
    "overlap_b",
    "overlap_a_random",
    "overlap_b_random",
    "n_signed",
    "n_same_sign",
    "same_sign",
    "status",
    "detail",
]
_METRICS = COLUMNS[COLUMNS.index("n_a") : COLUMNS.index("same_sign") + 1]
_ITEM_COLUMNS = ("tensor", "status", "detail", "dtype_base", "dtypes_ft", "shape")
# The terminal's columns of the rollup tables, under short headers (see report.Table.view).
_VIEW = {
    "jaccard": "jaccard",
    "jaccard_random": "J_rand",
    "jaccard_magnitude": "J_mag",
    "vs_magnitude": "J/J_mag",
    "same_sign": "same_sign",
    "all_runs": "all_runs",
}
_PAIR_VIEW = {"jaccard": "jaccard", "jaccard_random": "J_rand", "jaccard_magnitude": "J_mag", "same_sign": "same_sign"}
_LEGEND = (
    "J_rand, J_mag: the random and magnitude-matched baselines of the Jaccard (J/J_mag: their ratio); same_sign: "
    "share of the entries both runs changed that moved the same way; all_runs: share of entries every run "
    "changed. All columns: --json, --rollups-csv."
)
_INTS = ["layer", "numel", "n_a", "n_b", "n_both", "n_union", "n_signed", "n_same_sign"]
_GENERIC_STEMS = {"model", "pytorch_model", "consolidated", "adapter_model", "weights", "checkpoint"}


# ---------------------------------------------------------------------------------------------
# labels


def _tails(spec: str) -> list[str]:
    """Candidate labels for one input, shortest first: a run name, then longer path tails."""
    path = Path(spec).expanduser()
    if not path.exists() and layout.is_hub_id(spec):
        repo, _, rev = spec.partition("@")
        name = repo.split("/")[-1]
        return [name, f"{name}@{rev}", f"{repo}@{rev}"] if rev else [name, repo]
    parts = [p for p in Path(os.path.abspath(path)).parts if p not in ("/", "")] or [spec]  # no resolve(): loops
    stem = parts[-1].split(".")[0]
    generic = path.is_file() and (stem in _GENERIC_STEMS or layout.is_index(parts[-1]) or "-of-" in stem)
    if generic and len(parts) > 1:
        parts = parts[:-1]  # .../run-a/model.safetensors -> run-a
    elif path.is_file():
        parts[-1] = stem or parts[-1]  # .../run-a.safetensors -> run-a
    return ["/".join(parts[-k:]) for k in range(1, len(parts) + 1)]


def derive_labels(specs: Sequence[str]) -> list[str]:
    """Short, unique run names from paths or Hub ids; collisions take longer path tails, then -2, -3, ..."""
    tails = [_tails(s) for s in specs]
    depth = [0] * len(specs)
    while True:
        labels = [t[min(d, len(t) - 1)] for t, d in zip(tails, depth, strict=True)]
        counts = Counter(labels)
        grow = [
            i
            for i, lab in enumerate(labels)
            if counts[lab] > 1
            and depth[i] < len(tails[i]) - 1
            and any(labels[j] == lab and tails[j] != tails[i] for j in range(len(labels)))  # same input: no help
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out: list[str] = []
    for lab in labels:  # identical inputs: first keeps its name, later ones are numbered
        new, k = lab, 1
        while new in out:
            k += 1
            new = f"{lab}-{k}"
        out.append(new)
    return out


def _check_labels(labels: Sequence[str], n_fts: int) -> list[str]:
    """One non-empty, unique label per fine-tune, in order; a single string is not a list of labels."""
    if isinstance(labels, str):  # list("ab") would label two fine-tunes 'a' and 'b'
        raise InputError(
            f"labels must be a list of {n_fts} names, one per fine-tune, not the string {labels!r}; "
            f"e.g. labels=[{labels!r}]"
        )
    labels = [str(x).strip() for x in labels]
    if len(labels) != n_fts:
        raise InputError(
            f"got {len(labels)} {option('--label')} value(s) for {n_fts} fine-tuned checkpoints; pass one per fine-tune"
        )
    if any(not x for x in labels):
        raise InputError(f"a {option('--label')} value is empty; give every fine-tune a non-empty name")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise InputError(f"{option('--label')} {dup[0]!r} is given more than once; labels must be unique")
    return labels


# ---------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class TensorConsistency:
    """One aligned tensor: its descriptive columns, and its counts when it was compared (None otherwise)."""

    item: dict[str, object]  # tensor, layer, module, shape, numel, linear, dtypes, compared_as, status, detail
    counts: Consistency | None


def _expected_consensus(c: Consistency) -> list[float]:
    """E[entries changed by exactly k runs] if each run changed its |M_r| entries independently at random."""
    poly = [1.0]
    for p in c.densities:  # Poisson-binomial: multiply by (1 − p + p x)
        poly = [a * (1 - p) + b * p for a, b in zip([*poly, 0.0], [0.0, *poly], strict=True)]
    return [c.numel * x for x in poly]


def _same_sign(c: Consistency) -> float:
    """Pooled over pairs: of commonly changed entries with a sign, the share moving the same way."""
    return ratio(sum(p.n_same_sign for p in c.pairs), sum(p.n_signed for p in c.pairs))


def _figures(c: Consistency) -> dict[str, float]:
    j, jr, jm = c.mean_jaccard, c.mean_jaccard_random, c.mean_jaccard_magnitude
    return {
        "numel": float(c.numel),
        "density": ratio(sum(c.changed), c.n_runs * c.numel),
        "jaccard": j,
        "jaccard_random": jr,
        "jaccard_magnitude": jm,
        "vs_random": ratio(j, jr),
        "vs_magnitude": ratio(j, jm),
        "same_sign": _same_sign(c),
        "all_runs": ratio(c.consensus[-1], c.numel),
    }


@dataclass(frozen=True)
class ConsistencyResult:
    """Per-tensor consistency counts of R runs against one base, plus the header that says how they were made."""

    header: dict[str, str]
    labels: tuple[str, ...]
    tensors: tuple[TensorConsistency, ...]

    def __repr__(self) -> str:
        o = self.overall()
        j = f"Jaccard {o['jaccard']:.4f} (magnitude-matched {o['jaccard_magnitude']:.4f})" if o else "nothing compared"
        return (
            f"<ConsistencyResult: {self.n_runs} runs {', '.join(self.labels)}; {j}; "
            ".to_frame() .overall() .pairs() .consensus() .report()>"
        )

    @property
    def n_runs(self) -> int:
        """R."""
        return len(self.labels)

    def _pair_labels(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(self.n_runs) for b in range(a + 1, self.n_runs)]

    def to_frame(self) -> pd.DataFrame:
        """One row per (tensor, pair of runs); tensors not compared keep their rows with empty counts."""
        rows: list[dict[str, object]] = []
        for t in self.tensors:
            dtypes = str(t.item["dtypes_ft"]).split(",")
            as_ = str(t.item["compared_as"]).split(",")
            for a, b in self._pair_labels():
                row: dict[str, object] = {k: v for k, v in t.item.items() if k in COLUMNS}
                row.update(run_a=self.labels[a], run_b=self.labels[b], dtype_a=dtypes[a], dtype_b=dtypes[b])
                row["compared_as"] = as_[a] if as_[a] == as_[b] else f"{as_[a]}|{as_[b]}"
                if t.counts is None:
                    row.update(dict.fromkeys(_METRICS, math.nan))
                else:
                    d = t.counts.pair(a, b).as_dict()
                    row.update({k: d[k] for k in _METRICS})
                rows.append(row)
        df = pd.DataFrame(rows, columns=COLUMNS)
        return df.astype({c: "Int64" for c in _INTS})

    def compared(self) -> list[TensorConsistency]:
        """Float tensors whose masks were built: the population every figure is over."""
        return [t for t in self.tensors if t.counts is not None]

    def _combine(self, ts: Iterable[TensorConsistency]) -> Consistency | None:
        items = [t.counts for t in ts if t.counts is not None]
        return combine(items) if items else None

    def overall_counts(self) -> Consistency | None:
        """Exact rollup (summed counts) over every compared tensor (None when none was compared)."""
        return self._combine(self.tensors)

    def linear_counts(self) -> Consistency | None:
        """Exact rollup (summed counts) over the 2-D matrices inside transformer blocks."""
        return self._combine(t for t in self.tensors if t.item["linear"])

    def overall(self) -> dict[str, float]:
        """Mean Jaccard against both baselines, same sign, consensus, over every compared tensor (like every
        analysis's ``overall()``: figure -> value; empty when nothing was compared). Counts: ``overall_counts()``."""
        c = self.overall_counts()
        return _figures(c) if c is not None else {}

    def linear_only(self) -> dict[str, float]:
        """The same figures over the 2-D matrices inside transformer blocks."""
        c = self.linear_counts()
        return _figures(c) if c is not None else {}

    def _stacked(self) -> bool:
        """Whether the checkpoints have several stacks (rollups are then per (stack, key))."""
        return any(t.item.get("stack") for t in self.tensors)

    def groups(self, key: str) -> dict[object, Consistency]:
        """Exact rollup per ``module`` or ``layer`` (tensors outside the blocks have no layer); keyed
        ``(stack, key)`` when the checkpoints have several stacks, in stack order."""
        stacked = self._stacked()
        keys: dict[object, list[TensorConsistency]] = {}
        for t in self.compared():
            k = t.item[key]
            if k is not None:
                keys.setdefault((str(t.item["stack"]), k) if stacked else k, []).append(t)
        order = sorted(keys, key=_group_order)
        return {k: combine(t.counts for t in keys[k] if t.counts is not None) for k in order}

    def by(self, key: str) -> pd.DataFrame:
        """Per ``module`` or ``layer`` (per (stack, key) with several stacks): mean off-diagonal Jaccard against
        both baselines, same sign, consensus."""
        data = {k: _figures(c) for k, c in self.groups(rollup_key(key, ("module", "layer"))).items()}
        df = pd.DataFrame.from_dict(data, orient="index").drop(columns="vs_random", errors="ignore")
        if self._stacked() and len(df):
            df.index = pd.MultiIndex.from_tuples(list(df.index), names=["stack", key])
        else:
            df.index.name = key
        return df

    def pairs(self, c: Consistency | None = None) -> pd.DataFrame:
        """One row per pair of runs for a rollup (default: overall)."""
        c = c if c is not None else self.overall_counts()
        if c is None:
            return pd.DataFrame()
        keep = ["density_a", "density_b", "jaccard", "jaccard_random", "jaccard_magnitude"]
        keep += ["overlap_a", "overlap_b", "same_sign"]
        rows = []
        for p in c.pairs:
            d = p.as_dict()
            rows.append({"run_a": self.labels[p.run_a], "run_b": self.labels[p.run_b], **{k: d[k] for k in keep}})
        return pd.DataFrame(rows)

    def matrix(self, c: Consistency | None = None) -> pd.DataFrame:
        """Runs x runs: "Jaccard (magnitude-matched baseline)" in each off-diagonal cell."""
        c = c if c is not None else self.overall_counts()
        if c is None:
            return pd.DataFrame()

        def cell(p: PairCounts) -> str:
            j, jm = p.jaccard, p.jaccard_magnitude
            return "—" if math.isnan(j) else f"{j:.3f} ({jm:.3f})"

        grid = [[("—" if a == b else cell(c.pair(a, b))) for b in range(self.n_runs)] for a in range(self.n_runs)]
        df = pd.DataFrame(grid, index=list(self.labels), columns=list(self.labels))
        df.index.name = "run"
        return df

    def consensus(self, parts: Sequence[Consistency] | None = None) -> pd.DataFrame:
        """Entries changed by exactly k runs, k = 0..R: count, fraction, and the independent-runs expectation.

        Over ``parts`` (default: every compared tensor); the expectation is summed tensor by tensor.
        """
        parts = list(parts) if parts is not None else [t.counts for t in self.compared() if t.counts is not None]
        if not parts:
            return pd.DataFrame()
        c = combine(parts)
        expected = [sum(x) for x in zip(*(_expected_consensus(p) for p in parts), strict=True)]
        return pd.DataFrame(
            {
                "count": list(c.consensus),
                "fraction": list(c.consensus_fraction),
                "fraction_random": [ratio(e, c.numel) for e in expected],
            },
            index=pd.Index(range(c.n_runs + 1), name="runs"),
        )

    def tensor_summary(self) -> pd.DataFrame:
        """One row per compared tensor: mean Jaccard against both baselines, densities, consensus histogram."""
        rows = []
        for t in self.compared():
            c = t.counts
            assert c is not None  # compared() keeps only tensors with counts
            row: dict[str, object] = {k: t.item[k] for k in ("tensor", "layer", "module", "numel")}
            row.update(_figures(c))
            row.update({f"density_{lab}": d for lab, d in zip(self.labels, c.densities, strict=True)})
            row.update({f"consensus_{k}": n for k, n in enumerate(c.consensus)})
            rows.append(row)
        return pd.DataFrame(rows)

    def structural(self) -> pd.DataFrame:
        """Tensors without masks (non-float, missing, mismatched) or with a note (dtype changes)."""
        cols = ["tensor", "status", "detail", "dtype_base", "dtypes_ft", "shape"]
        rows = [
            {k: t.item[k] for k in cols}
            for t in self.tensors
            if t.counts is None or t.item["status"] != Status.OK.value
        ]
        return pd.DataFrame(rows, columns=cols)

    def _summary(self) -> list[str]:
        o, lin = self.overall_counts(), self.linear_counts()
        if o is None:
            return ["No float tensor could be compared across all runs; see the structural findings."]
        f = _figures(o)
        n_pairs = len(o.pairs)
        if math.isnan(f["jaccard"]):
            return [
                f"No run changed any of the {o.numel:,} compared entries: every mask is empty and Jaccard is "
                "undefined (shown as —)."
            ]
        out = [
            f"Mean off-diagonal Jaccard {f['jaccard']:.4f} over {self.n_runs} runs ({count(n_pairs, 'pair')}, "
            f"{count(len(self.compared()), 'tensor')}, {o.numel:,} entries): random baseline pq/(p+q−pq) "
            f"{f['jaccard_random']:.4f}, magnitude-matched baseline {f['jaccard_magnitude']:.4f}.",
        ]
        vs = f["vs_magnitude"]
        side = against_one(vs, AGREEMENT_BAND)
        if side == "undefined":
            out.append("The magnitude-matched baseline is undefined here (no entries in common bins).")
        elif side == "above":
            out.append(
                f"Agreement exceeds the magnitude-matched baseline ({vs:.2f}x; {f['vs_random']:.2f}x random): "
                "the runs share more than update size and bf16 rounding explain."
            )
        elif side == "below":
            out.append(
                f"Agreement is below the magnitude-matched baseline ({vs:.2f}x; {f['vs_random']:.2f}x random): "
                "the runs avoid each other's entries more than update size and bf16 rounding predict."
            )
        else:
            out.append(
                f"Agreement does not exceed the magnitude-matched baseline ({vs:.2f}x; {f['vs_random']:.2f}x "
                "random): update size and bf16 rounding alone explain it."
            )
        if lin is not None and not math.isnan(lin.mean_jaccard):
            g = _figures(lin)
            out.append(
                f"Linear layers only: Jaccard {g['jaccard']:.4f} vs random {g['jaccard_random']:.4f} and "
                f"magnitude-matched {g['jaccard_magnitude']:.4f} ({g['vs_magnitude']:.2f}x)."
            )
        if not math.isnan(f["same_sign"]):
            out.append(f"{f['same_sign']:.1%} of entries changed by both runs of a pair moved in the same direction.")
        cons = self.consensus()
        every = "both runs" if self.n_runs == 2 else f"all {self.n_runs} runs"
        out.append(
            f"{cons['fraction'].iloc[-1]:.2%} of entries were changed by {every} (independent runs: "
            f"{cons['fraction_random'].iloc[-1]:.2%}); {cons['fraction'].iloc[0]:.2%} by none."
        )
        return out

    def report(self) -> Report:
        """The report the CLI renders."""
        o, lin = self.overall_counts(), self.linear_counts()
        overall = figures_table(
            {name: _figures(c) for name, c in (("overall", o), ("linear layers", lin)) if c is not None}
        )
        matrix = self.matrix(o)
        numbered = matrix.set_axis([str(i) for i in range(1, len(matrix.columns) + 1)], axis=1)
        numbered.index = pd.MultiIndex.from_arrays([range(1, len(matrix) + 1), matrix.index], names=["#", "run"])
        tables = [
            Table("Overall (counts summed over tensors)", overall),
            Table(
                "Pairwise Jaccard, overall",
                matrix,
                "Each cell: Jaccard (in brackets the magnitude-matched baseline: the Jaccard two runs would reach by "
                "changing, at their own densities, entries picked at random among base weights of the same magnitude).",
                compact=numbered,  # columns by run number when the labels make the matrix too wide
            ),
            Table(
                "Pairs, overall",
                self.pairs(o),
                "overlap_a = |A∩B|/|A| (random baseline: density_b).",
                _PAIR_VIEW,
                _LEGEND,
            ),
            Table("Per module type (mean off-diagonal Jaccard)", self.by("module"), view=_VIEW, legend=_LEGEND),
            Table("Per layer (mean off-diagonal Jaccard)", self.by("layer"), view=_VIEW, legend=_LEGEND),
            Table("Consensus histogram: entries changed by exactly k runs", self.consensus()),
        ]
        extra = {
            "labels": list(self.labels),
            "per_tensor": self.tensor_summary().to_dict(orient="records"),
        }
        title = "ckptdiff consistency"
        items = pd.DataFrame([t.item for t in self.tensors], columns=[*_ITEM_COLUMNS])
        listed = pd.Series([t.counts is None or t.item["status"] != Status.OK.value for t in self.tensors])
        skipped = (items["status"] == Status.NON_FLOAT.value).map({True: "integer", False: ""})
        findings, notes = digest(items, listed, skipped)
        findings = findings[["tensor", "status", "detail", "dtype_base", "dtypes_ft", "shape"]]
        return Report(title, self.header, self._summary() + notes, tables, self.to_frame(), findings, extra)


# ---------------------------------------------------------------------------------------------
# the analysis


def _group_order(key: object) -> tuple[int, str, object]:
    """Sort key of a consistency group: stacks in their order, then the layer or module itself."""
    if isinstance(key, tuple):
        return (stack_rank(str(key[0])), type(key[1]).__name__, key[1])
    return (0, type(key).__name__, key)


def _item(it: Aligned, mode: CompareMode) -> dict[str, object]:
    infos = it.infos
    base = infos[0]
    shape_src = next((i for i in infos if i is not None), None)
    shape = tuple(shape_src.shape) if shape_src is not None else ()
    fts = infos[1:]
    compared_as = [""] * len(fts)
    if it.comparable and it.is_float and base is not None:
        compared_as = [
            dtype_name(comparison_dtype(base.dtype.torch, i.dtype.torch, mode.as_dtype)) if i else "" for i in fts
        ]
    return {
        "tensor": it.name,
        "stack": it.stack,
        "layer": layer_of(it.name),
        "module": module_of(it.name),
        "expert": expert_of(it.name),
        "shape": "x".join(str(d) for d in shape) if shape else "scalar",
        "numel": shape_src.numel if shape_src is not None else 0,
        "linear": is_linear(it.name, shape),
        "dtype_base": fp8.label(base) if base is not None else "",
        "dtypes_ft": ",".join(fp8.label(i) if i is not None else "" for i in fts),
        "compared_as": ",".join(compared_as),
        "status": it.status.value,
        "detail": item_detail(it) or ("not a float tensor: no update mask" * (it.comparable and not it.is_float)),
    }


def _tensor_counts(tensors: tuple[torch.Tensor, ...], mode: CompareMode) -> Consistency:
    """Masks and signs of every run on the tensors' device, then the base's bins; counts only come back."""
    w0, fts = widen_fp8(tensors[0].reshape(-1)), [widen_fp8(t.reshape(-1)) for t in tensors[1:]]  # (n,) each
    masks = [update_mask(w0, w1, mode) for w1 in fts]  # R x (n,) bool
    signs = [delta_sign(w0, w1) for w1 in fts]  # R x (n,) int8
    del fts
    bins = exponent_bins(w0)  # (n,) int64
    del w0
    return consistency_from_masks(masks, bins, signs)


class ConsistencyAnalysis(Analysis):
    """Per-tensor update masks of every fine-tune against the base, reduced to exact counts."""

    name = "consistency"
    state_fields = ("counts",)

    def __init__(self, labels: Sequence[str], mode: CompareMode = CompareMode(), sides: Sequence[int] | None = None):
        super().__init__(sides if sides is not None else range(len(labels) + 1))
        self.labels = tuple(labels)
        self.mode = mode
        self.items: list[Aligned] = []
        self.counts: dict[str, Consistency] = {}

    def form(self, item: Aligned) -> Form | None:
        return Form.TENSOR if item.comparable and item.is_float else None

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)

    def on_tensor(self, item: Aligned, tensors: tuple[torch.Tensor, ...]) -> None:
        self.counts[item.name] = _tensor_counts(tensors, self.mode)

    def finish(self, run: Run) -> ConsistencyResult:
        tensors = tuple(TensorConsistency(_item(it, self.mode), self.counts.get(it.name)) for it in self.items)
        head = run.header("consistency", self.sides, self.mode, runs=", ".join(self.labels))
        return ConsistencyResult(head, self.labels, tensors)


def run_labels(
    fts: Sequence[SourceLike], labels: Sequence[str] | None, *, minimum: int = 2, command: str = "consistency"
) -> list[str]:
    """The fine-tunes' labels: given (checked), or derived from their paths or Hub ids."""
    if isinstance(fts, (str, Source)) or len(fts) < minimum:
        got = 1 if isinstance(fts, (str, Source)) else len(fts)
        many = "two or more" if minimum > 1 else "one or more"
        raise InputError(
            f"{command} needs at least {minimum} fine-tuned checkpoint(s), got {got}; pass {many} after BASE"
        )
    specs = [s.spec if isinstance(s, Source) else str(s) for s in fts]
    return _check_labels(labels, len(fts)) if labels is not None else derive_labels(specs)


def consistency(
    base: SourceLike,
    fts: Sequence[SourceLike],
    *,
    labels: Sequence[str] | None = None,
    mode: CompareMode | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
    merged_dtype: torch.dtype | str | None = None,
) -> ConsistencyResult:
    """Cross-run consistency of R >= 2 fine-tunes of ``base``, streamed one tensor per checkpoint at a time."""
    mode = compare_mode(mode, rtol=rtol, atol=atol, as_dtype=as_dtype)
    names = run_labels(fts, labels)
    (result,) = run_analyses(
        [base, *fts],
        [ConsistencyAnalysis(names, mode)],
        labels=["base", *names],
        include=include,
        exclude=exclude,
        device=device,
        progress=progress,
        label="comparing",
        merged_dtype=merged_dtype,
    )
    return result  # type: ignore[no-any-return]
