"""Figures for ``ckptdiff report``: what a person would rather look at than read, as standalone SVG documents.

Each figure is drawn on a :class:`matplotlib.figure.Figure` (never pyplot: no window, no global figure manager,
safe in threads) and written with the SVG backend, text as paths, so the SVG needs no font and refers to nothing
outside itself. Output is deterministic: no date or creator metadata, and the SVG's internal ids are renumbered
in order of appearance and prefixed with the figure's name (unique within a report, so several SVGs can be
inlined in one HTML page without clashing ids). matplotlib is imported only when a figure is drawn.

A figure whose data is missing (analysis not run, no transformer layers, nothing changed) is left out.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

    from ckptdiff.analyses.consistency import ConsistencyResult
    from ckptdiff.analyses.full import FullReportResult
    from ckptdiff.analyses.principal import PrincipalOverlapResult
    from ckptdiff.analyses.sparsity import SparsityResult
    from ckptdiff.analyses.spectral import SpectralDriftResult
    from ckptdiff.analyses.trajectory import TrajectoryResult


@dataclass(frozen=True)
class Figure:
    """One rendered figure."""

    name: str  # file stem, unique, filename-safe: "<analysis>_<kind>", + "_<run>" with several runs
    title: str
    caption: str  # what is shown, and which baseline or control stands beside it
    svg: str  # a standalone SVG document
    analysis: str = ""  # sparsity | principal | spectral | consistency: the report section it belongs to
    run: str = ""  # the fine-tune's label for per-run figures, "" for cross-run ones
    scale: tuple[float, float] | None = None  # a heatmap's colour range (lowest, highest value), shared by its kind


# Module types in the order a transformer block runs them (ckptdiff.naming's names); others follow, sorted.
MODULE_ORDER = ("qkv", "q", "k", "v", "kv", "o", "gate_up", "router", "gate", "up", "down", "proj")
WIDTH = 8.0  # inches; 576 pt in the SVG
ANNOTATE_CELLS = 16 * 12  # heatmaps with at most this many cells get their values written in
RASTER_CELLS = 240  # heatmaps with more cells draw them as one embedded PNG (at RASTER_DPI) instead of paths
RASTER_DPI = 200
COLORS = {"observed": "#1f4e79", "random": "#8c8c8c", "magnitude": "#d9730d", "median": "#5b9bd5"}
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def figures(report: FullReportResult) -> list[Figure]:
    """Every figure the report's data supports, in section order (per fine-tune where per-run)."""
    several = len(report.runs) > 1
    names: set[str] = set()

    def stem(base: str, run: str) -> str:
        name = f"{base}_{_slug(run)}" if several and run else base
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}-{n}"
        names.add(unique)
        return unique

    out: list[Figure] = []
    if several:  # every fine-tune on one figure: the first thing the page shows after the comparison table
        for base, together in (
            ("compare_sparsity", _together_sparsity),
            ("compare_ulp", _together_ulp),
            ("compare_principal", _together_principal),
            ("compare_spectral", _together_spectral),
        ):
            drawn = together(report)
            if drawn is not None:
                name = stem(base, "")
                out.append(Figure(name, drawn.title, drawn.caption, _svg(drawn.fig, name), "comparison", ""))
    shared = _shared_range([r.grid() for r in report.sparsity.values()])  # one colour scale for every fine-tune
    shared_ratio = _shared_range([principal_grid(r) for r in report.principal.values()])

    def heatmap(result: SparsityResult, run: str) -> _Drawn | None:
        return _sparsity_heatmap(result, run, shared, several)

    def ratio_map(result: PrincipalOverlapResult, run: str) -> _Drawn | None:
        return _principal_heatmap(result, run, shared_ratio, several)

    makers: list[tuple[str, dict[str, Any], list[tuple[str, Callable[..., _Drawn | None]]]]] = [
        ("sparsity", report.sparsity, [("sparsity_heatmap", heatmap), ("sparsity_ulp", _ulp_hist)]),
        ("principal", report.principal, [("principal_overlap", _principal_overlap), ("principal_heatmap", ratio_map)]),
        ("spectral", report.spectral, [("spectral_drift", _spectral_drift), ("spectral_intruders", _intruders)]),
    ]
    for analysis, results, kinds in makers:
        for run, result in results.items():
            for base, make in kinds:
                drawn = make(result, run if several else "")
                if drawn is not None:
                    name = stem(base, run)
                    svg = _svg(drawn.fig, name)
                    out.append(Figure(name, drawn.title, drawn.caption, svg, analysis, run, drawn.scale))
    if report.consistency is not None:
        for base, cmake in (("consistency_jaccard", _jaccard_matrix), ("consistency_consensus", _consensus)):
            drawn = cmake(report.consistency)
            if drawn is not None:
                name = stem(base, "")
                svg = _svg(drawn.fig, name)
                out.append(Figure(name, drawn.title, drawn.caption, svg, "consistency", "", drawn.scale))
    return out


# ---------------------------------------------------------------------------------------------
# plumbing


@dataclass
class _Drawn:
    fig: MplFigure
    title: str
    caption: str
    scale: tuple[float, float] | None = None


def _slug(text: str) -> str:
    """A filename-safe fragment of a label: ASCII letters, digits and ``_ . -`` kept, anything else ``_``."""
    return _SAFE.sub("_", text)[:80] or "run"


def _t(text: object) -> str:
    """Text for matplotlib, literal: a ``$`` would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


def _new(height: float, width: float = WIDTH, **kwargs: Any) -> MplFigure:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=72, layout="constrained", **kwargs)
    fig.patch.set_facecolor("white")
    return fig


_ID = re.compile(r'\bid="([^"]+)"')
_COMMENT = re.compile(r"<!--.*?-->\s*", re.S)
_PROLOG = re.compile(r"<\?xml[^>]*\?>\s*(<!DOCTYPE[^>]*>\s*)?", re.S)


def _svg(fig: MplFigure, name: str) -> str:
    """The figure as a standalone SVG: no metadata, comments or DOCTYPE; ids renumbered ``<name>-<i>``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    # Lay out once on an Agg canvas (drawing disabled: cheap), then freeze the positions: savefig would
    # otherwise run the constrained layout again in an SVG dry run and in the real draw.
    FigureCanvasAgg(fig)  # a canvas attaches itself as fig.canvas: no pyplot, no GUI backend
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    FigureCanvasSVG(fig)
    buf = io.StringIO()
    no_meta = {"Date": None, "Creator": None, "Format": None, "Type": None}
    fig.savefig(buf, format="svg", metadata=no_meta, facecolor="white", dpi=RASTER_DPI)
    text = _COMMENT.sub("", buf.getvalue())
    text = _PROLOG.sub("", text, count=1)
    ids = list(dict.fromkeys(_ID.findall(text)))
    if ids:
        table = {old: f"{name}-{i}" for i, old in enumerate(ids)}
        alternatives = "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
        pattern = re.compile(rf'(id="|#)({alternatives})(?=["\)])')
        text = pattern.sub(lambda m: m.group(1) + table[m.group(2)], text)
    return '<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + text.strip() + "\n"


def _label_bar(ax: Axes, rect: Any, text: str) -> None:
    """``text`` just above the top of one bar, small and grey."""
    ax.annotate(
        text,
        (rect.get_x() + rect.get_width() / 2, rect.get_height()),
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
        color="#333333",
    )


def _floats(values: Any) -> list[float]:
    """Any sequence of numbers (pandas NA included) as floats, NA as NaN."""
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _layer_axis(ax: Axes, layers: Sequence[object], axis: str = "x") -> None:
    """Integer layer ticks: every layer when few, else about 16 evenly spaced."""
    n = len(layers)
    step = 1 if n <= 24 else math.ceil(n / 16)
    ticks = list(range(0, n, step))
    labels = [str(layers[i]) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels)
    else:
        ax.set_yticks(ticks, labels)


def _layer_names(index: Iterable[object]) -> list[str]:
    """Tick labels of a per-layer rollup: ``3``, or ``vision 3`` for a (stack, layer) row of a checkpoint with
    several stacks."""
    return [f"{x[0]} {int(x[1])}" if isinstance(x, tuple) else str(int(x)) for x in index]  # type: ignore[call-overload]


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)


def _for_run(run: str) -> str:
    return f" ({run})" if run else ""


def _module_order(modules: Sequence[str]) -> list[str]:
    known = [m for m in MODULE_ORDER if m in modules]
    return known + sorted(m for m in modules if m not in MODULE_ORDER)


def _module_rows(index: Sequence[object]) -> list[object]:
    """The rows of a per-module rollup in block order: ``q`` ... ``down``, or, on a checkpoint with several stacks,
    (stack, module) rows with the stacks in the rollup's order (as data flows) and block order within each."""
    by_stack: dict[object, dict[str, object]] = {}  # stack (None: one stack) -> module name -> row, stacks in order
    for r in index:
        stack, module = r if isinstance(r, tuple) else (None, r)
        by_stack.setdefault(stack, {})[str(module)] = r
    return [mine[m] for mine in by_stack.values() for m in _module_order(list(mine))]


# ---------------------------------------------------------------------------------------------
# colour scales

# A sequential scale spans at least this much (in the figure's own units, fractions here): cells that differ by
# less are noise at this resolution and are painted in nearly the same colour, not from one end of the map to the
# other (0.341 to 0.343 is not a purple-to-yellow difference).
MIN_SPAN = 0.05
MIN_SPAN_RATIO = 0.1  # a diverging scale of ratios around 1 spans at least 1 ± this


def colour_scale(
    span: tuple[float, float], kind: str = "sequential", bounds: tuple[float, float] | None = None
) -> tuple[Any, Any]:
    """(colormap, norm) for a heatmap whose values lie in ``span``.

    ``sequential`` (a quantity from low to high: sparsity, Jaccard): viridis over the span, widened about its
    middle to at least :data:`MIN_SPAN` and kept inside ``bounds``. ``diverging`` (a ratio to a control, where
    1 means no effect): a blue-white-red map centred on 1, symmetric, at least 1 ± :data:`MIN_SPAN_RATIO`.
    """
    import matplotlib as mpl
    from matplotlib.colors import Normalize, TwoSlopeNorm

    lo, hi = span
    if kind == "diverging":
        reach = max(abs(lo - 1.0), abs(hi - 1.0), MIN_SPAN_RATIO)
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")
        return cmap, TwoSlopeNorm(1.0, 1.0 - reach, 1.0 + reach)
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
        if bounds is not None:  # slide the window back inside the bounds, keeping its width
            if lo < bounds[0]:
                lo, hi = bounds[0], min(bounds[1], bounds[0] + MIN_SPAN)
            if hi > bounds[1]:
                lo, hi = max(bounds[0], bounds[1] - MIN_SPAN), bounds[1]
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    return cmap, Normalize(lo, hi)


def _ratio_limits(ax: Axes, values: Sequence[float]) -> None:
    """A ratio axis spans at least 1 ± :data:`MIN_SPAN_RATIO`: ratios inside the no-effect band then lie near the
    line at 1 instead of filling the plot (an axis zoomed onto 0.998-1.008 paints noise as signal)."""
    seen = _finite(values)
    lo = min([*seen, 1.0 - MIN_SPAN_RATIO])
    hi = max([*seen, 1.0 + MIN_SPAN_RATIO])
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)


def _shared_range(grids: Sequence[pd.DataFrame]) -> tuple[float, float] | None:
    """The range of every finite cell of several heatmaps (None when there is none)."""
    flat = [
        v
        for g in grids
        if not g.empty
        for v in _finite(g.to_numpy(dtype="float64", na_value=math.nan).ravel().tolist())
    ]
    return (min(flat), max(flat)) if flat else None


def _scale_words(observed: tuple[float, float], scale: tuple[float, float], several: bool) -> str:
    """The caption's sentence on the colour scale: shared across fine-tunes, widened to the minimum span."""
    shown = f"the colour scale runs from {scale[0]:.4f} to {scale[1]:.4f}"
    why = " (the same for every fine-tune's heatmap, so colours compare across them)" if several else ""
    cells = f"; this fine-tune's cells lie in {observed[0]:.4f} to {observed[1]:.4f}"
    if observed[1] - observed[0] < MIN_SPAN:
        cells += f" (a scale spans at least {MIN_SPAN:g}, so differences smaller than that show as near-equal colours)"
    return f"{shown}{why}{cells}."


# ---------------------------------------------------------------------------------------------
# sparsity


def _grid_values(grid: pd.DataFrame) -> tuple[pd.DataFrame, list[list[float]]]:
    """A layer x module grid in block order (modules as a block runs them) and its cells as (modules, layers)."""
    grid = grid[_module_order([str(c) for c in grid.columns])]
    return grid, grid.to_numpy(dtype="float64", na_value=math.nan).T.tolist()


def _draw_grid(grid: pd.DataFrame, values: list[list[float]], cmap: Any, norm: Any, label: str) -> tuple[Any, Axes]:
    """A layer x module heatmap (layers along x, module types down y), values written in when few, with its
    colour bar labelled ``label``."""
    import numpy as np

    layers = _layer_names(grid.index)
    modules = [str(c) for c in grid.columns]
    n_l, n_m = len(layers), len(modules)
    height = 1.3 + 0.32 * n_m
    fig = _new(height, width=min(WIDTH, max(4.8, 1.8 + 0.6 * n_l)))
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(np.array(values, dtype=float))
    if n_l * n_m <= RASTER_CELLS:  # vector cells, white gaps between them
        mesh = ax.pcolormesh(data, cmap=cmap, norm=norm, edgecolors="white", linewidth=0.5)
    else:  # many cells: one embedded bitmap keeps the SVG small; axes, labels and colourbar stay vector
        mesh = ax.pcolormesh(data, cmap=cmap, norm=norm, edgecolors="face", linewidth=0.2, rasterized=True)
        ax.hlines(range(1, n_m), 0, n_l, colors="white", linewidth=1.0)
    ax.set_xlim(0, n_l)
    ax.set_ylim(n_m, 0)
    ax.set_yticks([j + 0.5 for j in range(n_m)], [_t(m) for m in modules])
    step = 1 if n_l <= 24 else math.ceil(n_l / 16)
    ticks = list(range(0, n_l, step))
    ax.set_xticks([i + 0.5 for i in ticks], [str(layers[i]) for i in ticks])
    ax.tick_params(labelsize=8, length=2)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel("module", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if n_l * n_m <= ANNOTATE_CELLS and n_l <= 16:
        size = 8 if n_l <= 8 else 7 if n_l <= 12 else 6
        diverging = norm.vmin < 1.0 < norm.vmax and type(norm).__name__ == "TwoSlopeNorm"
        for j, row in enumerate(values):
            for i, v in enumerate(row):
                if math.isfinite(v):
                    shade = float(norm(v))
                    dark = abs(shade - 0.5) > 0.3 if diverging else shade < 0.55
                    color = "white" if dark else "black"
                    ax.text(i + 0.5, j + 0.5, f"{v:.3f}", ha="center", va="center", fontsize=size, color=color)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.015, aspect=max(3.0, 3.0 * n_m))
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)
    bar.outline.set_visible(False)
    return fig, ax


def _sparsity_heatmap(
    result: SparsityResult, run: str, shared: tuple[float, float] | None = None, several: bool = False
) -> _Drawn | None:
    """Layer x module sparsity of the linear matrices: layers along x, module types down y; ``shared``: the
    colour range of every fine-tune's heatmap together (so colours compare across fine-tunes)."""
    grid = result.grid()
    if grid.empty:
        return None
    grid, values = _grid_values(grid)
    flat = _finite([v for row in values for v in row])
    if not flat:
        return None
    observed = min(flat), max(flat)
    cmap, norm = colour_scale(shared or observed, "sequential", bounds=(0.0, 1.0))
    lo, hi = norm.vmin, norm.vmax
    fig, ax = _draw_grid(grid, values, cmap, norm, "sparsity")
    ax.set_title(_t(f"Update sparsity per layer and module{_for_run(run)}"), fontsize=10, loc="left")
    o, lin = result.overall(), result.linear_only()
    n_l, n_m = grid.shape
    missing = " Grey: no such matrix in that layer." if len(flat) < n_l * n_m else ""
    caption = (
        f"Fraction of entries left unchanged (update sparsity) in each linear matrix type (rows) of each of "
        f"{n_l} transformer layers (columns), parameter-weighted within a cell; "
        f"{_scale_words(observed, (lo, hi), several)}"
        f"{missing} For reference: {o['sparsity']:.4f} over every compared "
        f"tensor, {lin['sparsity']:.4f} over the linear layers."
    )
    if "sparsity_fp32" in o:
        caption += (
            f" Rounded to bf16, as bf16 storage would keep them, the fp32/fp64 tensors' sparsity is "
            f"{o['sparsity_bf16']:.4f} ({o['sparsity_fp32']:.4f} natively)."
        )
    elif "sparsity_bf16" in o:
        caption += f" Rounded to bf16, as bf16 storage would keep them: {o['sparsity_bf16']:.4f} overall."
    return _Drawn(fig, f"Sparsity by layer and module{_for_run(run)}", caption, (float(lo), float(hi)))


_ULP_NAMES = {"ulp_1": "1", "ulp_2": "2", "ulp_3_4": "3–4", "ulp_5_16": "5–16", "ulp_gt16": ">16"}


def _ulp_hist(result: SparsityResult, run: str) -> _Drawn | None:
    """Changed entries by how many ULPs they moved, plus changes involving NaN."""
    o = result.overall()
    changed = o.get("changed", 0.0)
    if not changed or not math.isfinite(changed):
        return None
    counts = {label: float(o.get(key, 0.0)) for key, label in _ULP_NAMES.items()}
    compared = result.compared()
    nonfinite = float(compared["changed_nonfinite"].astype("float64").fillna(0.0).sum()) if len(compared) else 0.0
    if nonfinite > 0:
        counts["non-finite"] = nonfinite
    fig = _new(3.2, width=4.8)
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    labels = list(counts)
    shares = [100.0 * c / changed for c in counts.values()]
    colors = [COLORS["observed"]] * len(_ULP_NAMES) + [COLORS["magnitude"]] * (len(labels) - len(_ULP_NAMES))
    bars = ax.bar(range(len(labels)), shares, color=colors, width=0.7)
    for rect, c in zip(bars, counts.values(), strict=True):
        _label_bar(ax, rect, _compact(c))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("distance moved, in ULPs of the compared dtype", fontsize=9)
    ax.set_ylabel("% of changed entries", fontsize=9)
    ax.set_ylim(0, max(shares) * 1.15)
    dtypes = sorted({str(d) for d in compared["compared_as"] if d}) if len(compared) else []
    ax.set_title(_t(f"How far changed entries moved{_for_run(run)}"), fontsize=10, loc="left")
    nan_note = (
        f" The orange bar counts {int(nonfinite):,} changes involving NaN or infinity (no ULP distance)."
        if nonfinite
        else ""
    )
    caption = (
        f"Each changed entry by its distance from the base value in representable steps (ULPs) of the compared "
        f"dtype ({', '.join(dtypes) or 'native'}); bars are shares of the {int(changed):,} changed entries, labels "
        f"the counts. 1 ULP is the smallest change a stored value can make: a large share there is what small "
        f"updates rounded to the storage dtype look like.{nan_note}"
    )
    return _Drawn(fig, f"ULP distance of changed entries{_for_run(run)}", caption)


def _compact(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{int(n):,}"


# ---------------------------------------------------------------------------------------------
# principal overlap


def _principal_overlap(result: PrincipalOverlapResult, run: str) -> _Drawn | None:
    """Per layer: overlap with the principal mask against both baselines, and the two ratios around 1."""
    from ckptdiff.metrics.numeric import OVERLAP_BAND as BAND

    df = result.by("layer")
    cols = ["overlap_principal", "baseline_principal", "baseline_principal_magnitude"]
    if df.empty or any(c not in df.columns for c in cols):
        return None
    overlap = _floats(df["overlap_principal"])
    if not _finite(overlap):
        return None
    layers = _layer_names(df.index)
    x = list(range(len(layers)))
    marker = "o" if len(layers) <= 40 else None
    fig = _new(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for ax in (top, bottom):
        _style(ax)
    random = _floats(df["baseline_principal"])
    matched = _floats(df["baseline_principal_magnitude"])
    top.plot(x, overlap, color=COLORS["observed"], marker=marker, ms=3.5, lw=1.6, label="observed overlap")
    top.plot(x, random, color=COLORS["random"], ls="--", lw=1.2, label="random baseline (≈ α)")
    top.plot(
        x, matched, color=COLORS["magnitude"], ls=":", marker=marker, ms=3, lw=1.4, label="magnitude-matched baseline"
    )
    top.set_ylabel("share of updated entries\nin the principal mask", fontsize=8)
    top.legend(fontsize=8, frameon=False, ncols=3, loc="lower left", bbox_to_anchor=(0, 1.0))
    r_random = _floats(df["ratio_principal"])
    r_matched = _floats(df["ratio_principal_magnitude"])
    bottom.axhspan(1 - BAND, 1 + BAND, color="#eeeeee", lw=0)
    bottom.axhline(1.0, color="#666666", lw=0.8)
    bottom.plot(x, r_random, color=COLORS["random"], marker=marker, ms=3, lw=1.2, label="vs random")
    bottom.plot(x, r_matched, color=COLORS["magnitude"], marker=marker, ms=3, lw=1.4, label="vs magnitude-matched")
    _ratio_limits(bottom, r_random + r_matched)
    bottom.set_ylabel("observed / expected", fontsize=8)
    bottom.legend(fontsize=8, frameon=False, ncols=2, loc="best")
    bottom.set_xlabel("layer", fontsize=9)
    _layer_axis(bottom, layers)
    top.set_title(_t(f"Overlap with the principal weights per layer{_for_run(run)}"), fontsize=10, loc="left", pad=18)
    k = result.header.get("k", "?")
    k = "chosen per matrix, the k column of the CSV" if str(k).startswith("chosen per matrix") else k
    caption = (
        f"Top: the share of each layer's updated entries that fall in the base's principal mask (top-k = {k} "
        f"singular directions, α = {result.alpha:g}), against the random baseline (the mask's share of entries, "
        f"what an update blind to the weights would hit) and the magnitude-matched baseline (what an update that "
        f"chose entries only by the base weights' magnitude would hit). Bottom: observed / expected for each; the "
        f"grey band (1 ± {BAND:.0%}) counts as no effect. Below 1 the update avoids the principal weights, above "
        f"1 it targets them; only a departure from the magnitude-matched line is more than update size and "
        f"rounding. The ratio axis spans at least {1 - MIN_SPAN_RATIO:g} to {1 + MIN_SPAN_RATIO:g}."
    )
    return _Drawn(fig, f"Principal-weight overlap by layer{_for_run(run)}", caption)


def principal_grid(result: PrincipalOverlapResult) -> pd.DataFrame:
    """Layer x module: overlap with the principal mask over its magnitude-matched baseline, the linear matrices of
    each cell rolled up as principal-overlap rolls up any scope (expected intersections summed, then divided)."""
    import pandas as pd

    from ckptdiff.analyses.principal import rollup

    df = result.analysed()
    df = df[df["linear"].astype(bool)].dropna(subset=["layer"])
    if df.empty:
        return pd.DataFrame()
    cells = {}
    for (layer, module), group in df.groupby(["layer", "module"], sort=True):
        cells[(int(layer), str(module))] = rollup(group)["ratio_principal_magnitude"]  # type: ignore[call-overload]
    return pd.Series(cells).unstack()


def _principal_heatmap(
    result: PrincipalOverlapResult, run: str, shared: tuple[float, float] | None = None, several: bool = False
) -> _Drawn | None:
    """Layer x module principal overlap over its magnitude-matched control, on a diverging scale centred on 1."""
    from ckptdiff.metrics.numeric import OVERLAP_BAND as BAND

    grid = principal_grid(result)
    if grid.empty:
        return None
    grid, values = _grid_values(grid)
    flat = _finite([v for row in values for v in row])
    if not flat:
        return None
    observed = min(flat), max(flat)
    cmap, norm = colour_scale(shared or observed, "diverging")
    fig, ax = _draw_grid(grid, values, cmap, norm, "overlap ÷ magnitude-matched")
    ax.set_title(_t(f"Principal overlap ÷ magnitude-matched{_for_run(run)}"), fontsize=10, loc="left")
    same = " the same for every fine-tune's heatmap, so colours compare across them;" if several else ""
    caption = (
        "For each linear matrix type (rows) of each layer (columns): the share of updated entries in the base's "
        "principal mask divided by its magnitude-matched baseline. A ratio is read against 1, so the colour scale "
        f"diverges from white at 1 (blue below: avoids the principal weights beyond what update size explains; red "
        f"above: targets them); it runs from {norm.vmin:.3f} to {norm.vmax:.3f},{same} symmetric about 1 and at "
        f"least 1 ± {MIN_SPAN_RATIO:g}, so that ratios inside the no-effect band (1 ± {BAND:.0%}) stay pale. "
        f"This fine-tune's cells lie in {observed[0]:.3f} to {observed[1]:.3f}."
    )
    return _Drawn(fig, f"Principal overlap by layer and module{_for_run(run)}", caption, (norm.vmin, norm.vmax))


# ---------------------------------------------------------------------------------------------
# spectral drift


def _spectral_drift(result: SpectralDriftResult, run: str) -> _Drawn | None:
    """Per layer: NSS (max, median) and the largest principal angle of the top-k subspaces."""
    df = result.by("layer")
    if df.empty or "nss_max" not in df.columns:
        return None
    nss_max, nss_med = _floats(df["nss_max"]), _floats(df["nss_median"])
    ang_max = [
        _nanmax(u, v) for u, v in zip(_floats(df["angle_u_deg_max"]), _floats(df["angle_v_deg_max"]), strict=True)
    ]
    ang_med = [
        _nanmax(u, v) for u, v in zip(_floats(df["angle_u_deg_median"]), _floats(df["angle_v_deg_median"]), strict=True)
    ]
    if not _finite(nss_max) and not _finite(ang_max):
        return None
    layers = _layer_names(df.index)
    x = list(range(len(layers)))
    marker = "o" if len(layers) <= 40 else None
    fig = _new(4.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax in (top, bottom):
        _style(ax)
    top.plot(x, nss_max, color=COLORS["observed"], marker=marker, ms=3.5, lw=1.6, label="max over matrices")
    top.plot(x, nss_med, color=COLORS["median"], ls="--", marker=marker, ms=3, lw=1.2, label="median")
    positive = [v for v in nss_max + nss_med if math.isfinite(v) and v > 0]
    log = bool(positive) and max(positive) / min(positive) >= 10
    if log:
        top.set_yscale("log", nonpositive="mask")
    top.set_ylabel("NSS" + (" (log)" if log else ""), fontsize=8)
    top.legend(fontsize=8, frameon=False, ncols=2, loc="lower left", bbox_to_anchor=(0, 1.0))
    has_max = bool(_finite(ang_max))
    if has_max:
        bottom.plot(x, ang_max, color=COLORS["observed"], marker=marker, ms=3.5, lw=1.6, label="max (stable angles)")
    bottom.plot(x, ang_med, color=COLORS["median"], ls="--", marker=marker, ms=3, lw=1.2, label="median")
    bottom.legend(fontsize=8, frameon=False, ncols=2, loc="best")
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("largest principal\nangle (degrees)", fontsize=8)
    bottom.set_xlabel("layer", fontsize=9)
    _layer_axis(bottom, layers)
    top.set_title(_t(f"Spectral drift and rotation per layer{_for_run(run)}"), fontsize=10, loc="left", pad=18)
    k = result.header.get("k", "?")
    k = "chosen per matrix, the k column of the CSV" if str(k).startswith("chosen per matrix") else k
    angles = (
        "the maximum over the layer's matrices whose angles are stable, and the median over those with k < min(m, n)."
        if has_max
        else f"only the median over the layer's matrices with k < min(m, n) is drawn, because no matrix has a stable "
        f"angle at k = {k} (its singular-value gap is too narrow against the update; a smaller --k may give some), so "
        "there is no maximum to show."
    )
    null = (
        " The equal-norm random null's ratios are in the tables (columns ending _r)."
        if result.with_null
        else " No random null was computed (run with --null random for one)."
    )
    caption = (
        f"Top: normalised spectral shift (NSS) of the singular values, the maximum and the median over each "
        f"layer's matrices{' (log scale)' if log else ''}. Bottom: the largest principal angle between the base's "
        f"and the fine-tune's top-k (k = {k}) singular subspaces, the larger of left and right: {angles} "
        f"Drift is not additive, so nothing is summed.{null}"
    )
    return _Drawn(fig, f"Spectral drift by layer{_for_run(run)}", caption)


def _intruders(result: SpectralDriftResult, run: str) -> _Drawn | None:
    """Per module type: intruder dimensions summed over its matrices, beside the equal-norm null's count; none
    when every count is 0 (the summary says so in a sentence)."""
    df = result.by("module")
    if df.empty or "intruders" not in df.columns:
        return None
    cols = [c for c in ("intruders", "intruders_null") if c in df.columns]
    if not (df[cols].fillna(0) > 0).any().any():
        return None
    rows = _module_rows(list(df.index))
    df = df.loc[rows]
    modules = [f"{r[0]} {r[1]}" if isinstance(r, tuple) else str(r) for r in rows]
    x = list(range(len(modules)))
    observed = [v if math.isfinite(v) else 0.0 for v in _floats(df["intruders"])]
    fig = _new(2.8)
    ax = fig.subplots()
    _style(ax)
    width = 0.38 if result.with_null else 0.6
    shift = width / 2 if result.with_null else 0.0
    bars = ax.bar([i - shift for i in x], observed, width, color=COLORS["observed"], label="fine-tune")
    for rect, v in zip(bars, observed, strict=True):
        _label_bar(ax, rect, f"{int(v)}")
    if result.with_null:
        counts = [v if math.isfinite(v) else 0.0 for v in _floats(df["intruders_null"])]
        ax.bar([i + shift for i in x], counts, width, color=COLORS["random"], label="equal-norm random update")
        ax.legend(fontsize=8, frameon=False, ncols=2, loc="lower left", bbox_to_anchor=(0, 1.0))
    ax.set_xticks(x, modules)
    ax.set_ylabel("intruder dimensions", fontsize=8)
    ax.set_ylim(bottom=0, top=max([1.0, *observed]) * 1.25)
    ax.set_title(_t(f"Intruder dimensions per module type{_for_run(run)}"), fontsize=10, loc="left", pad=18)
    defined = result.header.get("intruders", "")
    null = (
        " Grey: the same count for the base plus an equal-norm random update (the null)."
        if result.with_null
        else " No random null was computed (run with --null random for one)."
    )
    caption = (
        f"Intruder dimensions summed over each module type's matrices: {defined}. An intruder is a top direction of "
        f"the fine-tuned matrix that the base does not have (arXiv 2410.21228).{null}"
    )
    return _Drawn(fig, f"Intruder dimensions{_for_run(run)}", caption)


def _nanmax(a: float, b: float) -> float:
    vals = _finite([a, b])
    return max(vals) if vals else math.nan


# ---------------------------------------------------------------------------------------------
# every fine-tune together

RUN_COLORS = ("#1f4e79", "#d9730d", "#2e8b57", "#8e44ad", "#c0392b", "#7f8c8d", "#b7950b", "#16a085")
RUN_STYLES = ("-", "--", "-.", ":")
TOGETHER_WIDTH = 5.2  # inches: two of these figures side by side on a wide page


def _run_style(i: int) -> dict[str, Any]:
    """Colour and dash of the i-th fine-tune's line (dashes cycle too, so lines stay apart without colour)."""
    return {"color": RUN_COLORS[i % len(RUN_COLORS)], "ls": RUN_STYLES[(i // len(RUN_COLORS)) % len(RUN_STYLES)]}


def _per_layer_lines(frames: dict[str, pd.DataFrame], column: str) -> tuple[list[int], dict[str, list[float]]] | None:
    """The layers of every fine-tune's per-layer frame, and each fine-tune's ``column`` on them (NaN where absent)."""
    layers = sorted({int(i) for df in frames.values() if column in df.columns for i in df.index})
    if not layers:
        return None
    lines = {}
    for run, df in frames.items():
        if column not in df.columns:
            continue
        by = {int(i): v for i, v in zip(df.index, _floats(df[column]), strict=True)}
        lines[run] = [by.get(layer, math.nan) for layer in layers]
    return (layers, lines) if any(_finite(v) for v in lines.values()) else None


def _draw_lines(ax: Axes, layers: Sequence[int], lines: dict[str, list[float]]) -> None:
    x = list(range(len(layers)))
    marker = "o" if len(layers) <= 40 else None
    for i, (run, ys) in enumerate(lines.items()):
        ax.plot(x, ys, marker=marker, ms=3.5, lw=1.6, label=_t(_short(run)), **_run_style(i))
    ax.legend(fontsize=8, frameon=False, ncols=min(4, len(lines)), loc="lower left", bbox_to_anchor=(0, 1.0))
    _layer_axis(ax, layers)
    ax.set_xlabel("layer", fontsize=9)


def _together_sparsity(report: FullReportResult) -> _Drawn | None:
    """Update sparsity per layer, one line per fine-tune."""
    got = _per_layer_lines({run: r.by("layer") for run, r in report.sparsity.items()}, "sparsity")
    if got is None:
        return None
    layers, lines = got
    fig = _new(3.0, width=TOGETHER_WIDTH)
    ax = fig.add_subplot()
    _style(ax)
    _draw_lines(ax, layers, lines)
    ax.set_ylabel("update sparsity", fontsize=8)
    ax.set_title("Update sparsity per layer, every fine-tune", fontsize=10, loc="left", pad=18)
    overall = ", ".join(f"{run} {r.overall()['sparsity']:.4f}" for run, r in report.sparsity.items())
    caption = (
        "The fraction of each layer's entries left exactly as in the base (every tensor of the layer, "
        f"parameter-weighted), one line per fine-tune on one axis. Over every compared tensor: {overall}."
    )
    return _Drawn(fig, "Sparsity per layer, side by side", caption)


def _together_ulp(report: FullReportResult) -> _Drawn | None:
    """How far changed entries moved, in ULPs: one bar per fine-tune in each distance bucket."""
    shares: dict[str, list[float]] = {}
    for run, result in report.sparsity.items():
        o = result.overall()
        changed = o.get("changed", 0.0)
        if changed and math.isfinite(changed):
            shares[run] = [100.0 * float(o.get(key, 0.0)) / changed for key in _ULP_NAMES]
    if len(shares) < 2:
        return None
    n = len(shares)
    fig = _new(3.0, width=TOGETHER_WIDTH)
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    width = 0.8 / n
    for i, (run, ys) in enumerate(shares.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(_ULP_NAMES))]
        ax.bar(xs, ys, width, color=RUN_COLORS[i % len(RUN_COLORS)], label=_t(_short(run)))
    ax.set_xticks(range(len(_ULP_NAMES)), list(_ULP_NAMES.values()))
    ax.set_xlabel("distance moved, in ULPs of the compared dtype", fontsize=9)
    ax.set_ylabel("% of changed entries", fontsize=8)
    ax.legend(fontsize=8, frameon=False, ncols=min(4, n), loc="lower left", bbox_to_anchor=(0, 1.0))
    ax.set_title("How far changed entries moved, every fine-tune", fontsize=10, loc="left", pad=18)
    caption = (
        "Each fine-tune's changed entries by their distance from the base value in representable steps (ULPs) of "
        "the compared dtype, as shares of that fine-tune's changed entries, one bar per fine-tune in each bucket "
        "(changes involving NaN or infinity are left out here; each fine-tune's own histogram counts them). A "
        "large share at 1 ULP is what small updates rounded to the storage dtype look like."
    )
    return _Drawn(fig, "ULP distance of changed entries, side by side", caption)


def _together_principal(report: FullReportResult) -> _Drawn | None:
    """Principal overlap over its magnitude-matched baseline per layer, one line per fine-tune, the no-effect band."""
    from ckptdiff.metrics.numeric import OVERLAP_BAND as BAND

    frames = {run: r.by("layer") for run, r in report.principal.items()}
    got = _per_layer_lines(frames, "ratio_principal_magnitude")
    if got is None:
        return None
    layers, lines = got
    fig = _new(3.0, width=TOGETHER_WIDTH)
    ax = fig.add_subplot()
    _style(ax)
    ax.axhspan(1 - BAND, 1 + BAND, color="#eeeeee", lw=0)
    ax.axhline(1.0, color="#666666", lw=0.8)
    _draw_lines(ax, layers, lines)
    _ratio_limits(ax, [v for ys in lines.values() for v in ys])
    ax.set_ylabel("overlap ÷ magnitude-matched", fontsize=8)
    ax.set_title("Principal overlap against its control, every fine-tune", fontsize=10, loc="left", pad=18)
    caption = (
        "For each layer, the share of updated entries in the base's principal mask divided by what an update "
        "picking entries by base-weight magnitude alone would reach (the magnitude-matched baseline), one line "
        f"per fine-tune. The grey band (1 ± {BAND:.0%}) is no effect: below it a fine-tune avoids the principal "
        "weights beyond what its update size explains, above it targets them. The axis spans at least "
        f"{1 - MIN_SPAN_RATIO:g} to {1 + MIN_SPAN_RATIO:g}, so ratios inside the band lie near the line at 1 rather "
        "than filling the plot. The ratios to the random baseline are in each fine-tune's section."
    )
    return _Drawn(fig, "Principal overlap per layer, side by side", caption)


def _together_spectral(report: FullReportResult) -> _Drawn | None:
    """Median NSS per layer, one line per fine-tune (log scale when they span a decade or more)."""
    got = _per_layer_lines({run: r.by("layer") for run, r in report.spectral.items()}, "nss_median")
    if got is None:
        return None
    layers, lines = got
    fig = _new(3.0, width=TOGETHER_WIDTH)
    ax = fig.add_subplot()
    _style(ax)
    _draw_lines(ax, layers, lines)
    positive = [v for ys in lines.values() for v in ys if math.isfinite(v) and v > 0]
    log = bool(positive) and max(positive) / min(positive) >= 10
    if log:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_ylabel("median NSS" + (" (log)" if log else ""), fontsize=8)
    ax.set_title("Spectral drift per layer, every fine-tune", fontsize=10, loc="left", pad=18)
    caption = (
        "The median normalised spectral shift (NSS: how far the singular values moved, relative to their size) "
        f"over each layer's matrices, one line per fine-tune{' on a log scale' if log else ''}. Whether a drift is "
        "more than the update's size implies is read against the equal-norm random null (the comparison table, "
        "with --null random)."
    )
    return _Drawn(fig, "Spectral drift per layer, side by side", caption)


# ---------------------------------------------------------------------------------------------
# consistency


def _jaccard_matrix(result: ConsistencyResult) -> _Drawn | None:
    """Runs x runs: Jaccard of the update masks, the magnitude-matched baseline in each cell's text."""
    import numpy as np

    o = result.overall_counts()
    n = result.n_runs
    if o is None or n < 2:
        return None
    jac = np.full((n, n), np.nan)
    mag = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(n):
            if a != b:
                p = o.pair(min(a, b), max(a, b))
                jac[a, b], mag[a, b] = p.jaccard, p.jaccard_magnitude
    if not np.isfinite(jac).any():
        return None
    side = min(7.0, max(3.2, 1.0 + 0.9 * n))
    fig = _new(side, width=side + 1.4)
    ax = fig.add_subplot()
    off = [float(v) for v in jac[np.isfinite(jac)]]
    lo, hi = min(off), max(off)
    cmap, norm = colour_scale((lo, hi), "sequential", bounds=(0.0, 1.0))
    cmap = cmap.with_extremes(bad="#f0f0f0")
    mesh = ax.pcolormesh(np.ma.masked_invalid(jac), cmap=cmap, norm=norm, edgecolors="white", linewidth=1.0)
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    labels = [_t(_short(lab)) for lab in result.labels]
    if n > 2:
        ax.set_xticks([i + 0.5 for i in range(n)], labels, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks([i + 0.5 for i in range(n)], labels)
    ax.set_yticks([i + 0.5 for i in range(n)], labels)
    ax.tick_params(labelsize=8, length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if n <= 10:
        size = 9 if n <= 3 else 8 if n <= 6 else 7 if n <= 8 else 6
        for a in range(n):
            for b in range(n):
                if a == b:
                    ax.text(b + 0.5, a + 0.5, "—", ha="center", va="center", fontsize=size, color="#888888")
                    continue
                if not math.isfinite(jac[a, b]):
                    continue
                color = "white" if norm(jac[a, b]) < 0.55 else "black"
                text = f"{jac[a, b]:.3f}\n(mag. {mag[a, b]:.3f})"
                ax.text(b + 0.5, a + 0.5, text, ha="center", va="center", fontsize=size, color=color)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.03)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("Jaccard", fontsize=8)
    bar.outline.set_visible(False)
    ax.set_title("Jaccard of the update masks", fontsize=10, loc="left")
    f = o.mean_jaccard, o.mean_jaccard_random, o.mean_jaccard_magnitude
    scale = f", the scale from {norm.vmin:.3f} to {norm.vmax:.3f} for the pairs' range {lo:.3f} to {hi:.3f}"
    if hi - lo < MIN_SPAN:
        scale += f", widened to at least {MIN_SPAN:g} so that smaller differences are not painted as signal"
    caption = (
        f"Jaccard index |A∩B| / |A∪B| of the update masks of each pair of fine-tunes, over every compared entry "
        f"(colour{scale}); in brackets the magnitude-matched baseline, the Jaccard two runs would "
        f"reach by changing, at their own densities, entries picked at random among base weights of the same "
        f"magnitude. Mean off-diagonal: {f[0]:.4f}, against {f[1]:.4f} for random masks of the same densities and "
        f"{f[2]:.4f} magnitude-matched."
    )
    return _Drawn(fig, "Pairwise agreement of the update masks", caption, (float(norm.vmin), float(norm.vmax)))


def _short(label: str, limit: int = 24) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1) :]


def _consensus(result: ConsistencyResult) -> _Drawn | None:
    """Entries changed by exactly k of R runs: observed share against the independent-runs expectation."""
    df: pd.DataFrame = result.consensus()
    if df.empty:
        return None
    observed, expected = _floats(df["fraction"]), _floats(df["fraction_random"])
    if not _finite(observed):
        return None
    ks = [int(k) for k in df.index]
    n = len(ks)
    fig = _new(3.2, width=min(WIDTH, 4.0 + 0.6 * n))
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(False, axis="x")
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in range(n)], observed, w, color=COLORS["observed"], label="observed")
    b2 = ax.bar([i + w / 2 for i in range(n)], expected, w, color=COLORS["random"], label="independent runs")
    positive = [v for v in observed + expected if math.isfinite(v) and v > 0]
    log = bool(positive) and max(positive) / min(positive) >= 100
    if log:  # bars start at 0: clip (not mask) so they still draw, from just below the smallest share
        ax.set_yscale("log", nonpositive="clip")
        ax.set_ylim(min(positive) / 2, max(positive) * 1.6)
    elif n <= 8:
        for bars in (b1, b2):
            for rect in bars:
                h = rect.get_height()
                if math.isfinite(h):
                    _label_bar(ax, rect, f"{h:.1%}")
        ax.set_ylim(0, max(positive) * 1.15 if positive else 1)
    ax.set_xticks(range(n), [str(k) for k in ks])
    ax.set_xlabel(f"number of runs (of {result.n_runs}) that changed the entry", fontsize=9)
    ax.set_ylabel("share of entries" + (" (log)" if log else ""), fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_title("Consensus: entries changed by exactly k runs", fontsize=10, loc="left")
    caption = (
        f"The share of compared entries changed by exactly k of the {result.n_runs} fine-tunes, against the "
        f"expectation if each run had changed its own number of entries independently at random (Poisson-binomial, "
        f"summed tensor by tensor). More than expected at k = {result.n_runs} and k = 0, and less in between, "
        f"means the runs change the same entries."
    )
    return _Drawn(fig, "Consensus histogram", caption)


# ---------------------------------------------------------------------------------------------
# trajectory (a run's checkpoints over time)


def trajectory_figures(result: TrajectoryResult) -> list[Figure]:
    """The figures of ``ckptdiff trajectory``: sparsity over steps per module type (step over step, cumulative),
    and a layer x step heatmap of step-over-step sparsity."""
    out: list[Figure] = []
    makers: list[tuple[str, Callable[[TrajectoryResult], _Drawn | None]]] = [
        ("trajectory_step", lambda r: _over_steps(r, "sparsity_step")),
        ("trajectory_cumulative", lambda r: _over_steps(r, "sparsity_cumulative")),
        ("trajectory_layers", _layer_steps),
    ]
    for name, make in makers:
        drawn = make(result)
        if drawn is not None:
            out.append(Figure(name, drawn.title, drawn.caption, _svg(drawn.fig, name), "trajectory", ""))
    return out


_SERIES = (
    "#1f4e79", "#d9730d", "#2e8540", "#c0392b", "#7d3c98", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#5b9bd5", "#9e480e", "#636363",
)  # fmt: skip


def _over_steps(result: TrajectoryResult, figure: str) -> _Drawn | None:
    """One line per module type (and the overall figure, black) of ``figure`` against the step."""
    steps = result.steps_frame()
    if steps.empty:
        return None
    overall = steps[steps["scope"] == "overall"]
    scoped = steps[steps["scope"] != "overall"]
    pairs = list(dict.fromkeys(zip(scoped["stack"].astype(str), scoped["scope"].astype(str), strict=True)))
    lines = _module_rows([(st, m) if st else m for st, m in pairs])
    fig = _new(3.6)
    ax = fig.add_subplot()
    _style(ax)
    xs = [int(x) for x in overall["step"]]
    for i, line in enumerate(lines):
        stack, module = line if isinstance(line, tuple) else ("", line)
        rows = scoped[(scoped["stack"] == stack) & (scoped["scope"] == module)]
        ax.plot(
            [int(x) for x in rows["step"]],
            _floats(rows[figure]),
            marker="o",
            markersize=3,
            linewidth=1.0,
            color=_SERIES[i % len(_SERIES)],
            label=_t(f"{stack} {module}" if stack else str(module)),
        )
    ax.plot(xs, _floats(overall[figure]), marker="o", markersize=4, linewidth=2.2, color="black", label="overall")
    bf16 = _floats(overall[f"{figure}_bf16"])
    if _finite(bf16):
        ax.plot(xs, bf16, linestyle="--", linewidth=1.4, color="#8c8c8c", label="overall, as bf16")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("update sparsity (fraction unchanged)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    first = result.steps[0]
    if figure == "sparsity_step":
        title = "Step-over-step update sparsity"
        what = "each checkpoint against the one before it"
    else:
        title = f"Cumulative update sparsity (since step {first})"
        what = f"each checkpoint against the first (step {first})"
    ax.set_title(_t(title), fontsize=10, loc="left")
    o = _floats(overall[figure])
    caption = (
        f"Fraction of entries left unchanged, {what}, per module type (coloured) and over every compared float "
        f"tensor (black, {min(o):.4f} to {max(o):.4f}), parameter-weighted."
    )
    if _finite(bf16):
        caption += (
            " Dashed grey: the fp32 weights as bf16 would store them, the precision control (what a bf16 copy, "
            "as synchronised to inference engines, would see change)."
        )
    if figure == "sparsity_step":
        caption += _gaps(result.steps)
    return _Drawn(fig, title, caption)


def _gaps(steps: Sequence[int]) -> str:
    """What a step-over-step point spans: the same number of steps everywhere, or not (then say so)."""
    gaps = sorted({b - a for a, b in itertools.pairwise(steps)})
    if len(gaps) == 1:
        return f" Consecutive checkpoints are {gaps[0]} step{'s' if gaps[0] != 1 else ''} apart."
    return (
        f" The checkpoints are {gaps[0]} to {gaps[-1]} steps apart: a point counts every change since the checkpoint "
        "before it, so only points with equal gaps compare."
    )


def _layer_steps(result: TrajectoryResult) -> _Drawn | None:
    """Step-over-step sparsity per transformer layer (rows) and step (columns)."""
    import matplotlib as mpl
    import numpy as np
    from matplotlib.colors import Normalize

    grid = result.by("layer")
    if grid.empty:
        return None
    layers = _layer_names(grid.index)
    steps = [int(c) for c in grid.columns]
    values = grid.to_numpy(dtype="float64", na_value=math.nan).tolist()  # (layers, steps)
    flat = _finite([v for row in values for v in row])
    if not flat:
        return None
    lo, hi = min(flat), max(flat)
    if hi - lo < 1e-3:  # a minimum span: noise in the fourth decimal is not painted as signal
        lo, hi = max(0.0, lo - 5e-4), min(1.0, hi + 5e-4)
    n_l, n_s = len(layers), len(steps)
    fig = _new(1.4 + 0.28 * min(n_l, 40), width=min(WIDTH, max(4.8, 2.2 + 0.5 * n_s)))
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    norm = Normalize(lo, hi)
    data = np.ma.masked_invalid(np.array(values, dtype=float))
    raster = n_l * n_s > RASTER_CELLS
    mesh = ax.pcolormesh(
        data,
        cmap=cmap,
        norm=norm,
        edgecolors="face" if raster else "white",
        linewidth=0.2 if raster else 0.5,
        rasterized=raster,
    )
    ax.set_xlim(0, n_s)
    ax.set_ylim(n_l, 0)
    every = 1 if n_s <= 16 else math.ceil(n_s / 16)
    ax.set_xticks([i + 0.5 for i in range(0, n_s, every)], [str(steps[i]) for i in range(0, n_s, every)])
    every = 1 if n_l <= 24 else math.ceil(n_l / 16)
    ax.set_yticks([j + 0.5 for j in range(0, n_l, every)], [str(layers[j]) for j in range(0, n_l, every)])
    ax.tick_params(labelsize=8, length=2)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if n_l * n_s <= ANNOTATE_CELLS and n_s <= 12:
        for j, row in enumerate(values):
            for i, v in enumerate(row):
                if math.isfinite(v):
                    color = "white" if norm(v) < 0.55 else "black"
                    ax.text(i + 0.5, j + 0.5, f"{v:.3f}", ha="center", va="center", fontsize=7, color=color)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.015)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("step-over-step sparsity", fontsize=8)
    bar.outline.set_visible(False)
    ax.set_title("Step-over-step sparsity per layer", fontsize=10, loc="left")
    caption = (
        f"Fraction of entries left unchanged between each checkpoint and the one before it, per transformer layer "
        f"(rows, every tensor of the layer) and step (columns); the colour scale spans the observed range "
        f"{lo:.4f} to {hi:.4f} (at least 0.001 wide, so that noise is not painted as signal)."
    ) + _gaps(result.steps)
    return _Drawn(fig, "Step-over-step sparsity per layer", caption)
