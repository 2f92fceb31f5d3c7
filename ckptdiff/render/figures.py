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
import math
import re
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Figure:
    """One rendered figure."""

    name: str  # file stem, unique, filename-safe: "<analysis>_<kind>", + "_<run>" with several runs
    title: str
    caption: str  # what is shown, and which baseline or control stands beside it
    svg: str  # a standalone SVG document
    analysis: str = ""  # sparsity | principal | spectral | consistency: the report section it belongs to
    run: str = ""  # the fine-tune's label for per-run figures, "" for cross-run ones


# Module types in the order a transformer block runs them (ckptdiff.naming's names); others follow, sorted.
MODULE_ORDER = ("qkv", "q", "k", "v", "kv", "o", "gate_up", "router", "gate", "up", "down")
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
    makers: list[tuple[str, dict[str, Any], list[tuple[str, Callable[..., _Drawn | None]]]]] = [
        ("sparsity", report.sparsity, [("sparsity_heatmap", _sparsity_heatmap), ("sparsity_ulp", _ulp_hist)]),
        ("principal", report.principal, [("principal_overlap", _principal_overlap)]),
        ("spectral", report.spectral, [("spectral_drift", _spectral_drift), ("spectral_intruders", _intruders)]),
    ]
    for analysis, results, kinds in makers:
        for run, result in results.items():
            for base, make in kinds:
                drawn = make(result, run if several else "")
                if drawn is not None:
                    name = stem(base, run)
                    out.append(Figure(name, drawn.title, drawn.caption, _svg(drawn.fig, name), analysis, run))
    if report.consistency is not None:
        for base, cmake in (("consistency_jaccard", _jaccard_matrix), ("consistency_consensus", _consensus)):
            drawn = cmake(report.consistency)
            if drawn is not None:
                name = stem(base, "")
                out.append(Figure(name, drawn.title, drawn.caption, _svg(drawn.fig, name), "consistency", ""))
    return out


# ---------------------------------------------------------------------------------------------
# plumbing


@dataclass
class _Drawn:
    fig: MplFigure
    title: str
    caption: str


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


# ---------------------------------------------------------------------------------------------
# sparsity


def _sparsity_heatmap(result: SparsityResult, run: str) -> _Drawn | None:
    """Layer x module sparsity of the linear matrices: layers along x, module types down y."""
    import matplotlib as mpl
    from matplotlib.colors import Normalize

    grid = result.grid()
    if grid.empty:
        return None
    grid = grid[_module_order([str(c) for c in grid.columns])]
    layers = [int(x) for x in grid.index]
    modules = [str(c) for c in grid.columns]
    values = grid.to_numpy(dtype="float64", na_value=math.nan).T.tolist()  # (modules, layers)
    flat = _finite([v for row in values for v in row])
    if not flat:
        return None
    lo, hi = min(flat), max(flat)
    if hi - lo < 1e-3:
        lo, hi = max(0.0, lo - 5e-4), min(1.0, hi + 5e-4)
    n_l, n_m = len(layers), len(modules)
    height = 1.3 + 0.32 * n_m
    fig = _new(height, width=min(WIDTH, max(4.8, 1.8 + 0.6 * n_l)))
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    norm = Normalize(lo, hi)
    import numpy as np

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
        for j, row in enumerate(values):
            for i, v in enumerate(row):
                if math.isfinite(v):
                    color = "white" if norm(v) < 0.55 else "black"
                    ax.text(i + 0.5, j + 0.5, f"{v:.3f}", ha="center", va="center", fontsize=size, color=color)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.015, aspect=max(3.0, 3.0 * n_m))
    bar.ax.tick_params(labelsize=7)
    bar.set_label("sparsity", fontsize=8)
    bar.outline.set_visible(False)
    ax.set_title(_t(f"Update sparsity per layer and module{_for_run(run)}"), fontsize=10, loc="left")
    o, lin = result.overall(), result.linear_only()
    missing = " Grey: no such matrix in that layer." if len(flat) < n_l * n_m else ""
    caption = (
        f"Fraction of entries left unchanged (update sparsity) in each linear matrix type (rows) of each of "
        f"{n_l} transformer layers (columns), parameter-weighted within a cell; the colour scale spans the "
        f"observed range {lo:.4f} to {hi:.4f}.{missing} For reference: {o['sparsity']:.4f} over every compared "
        f"tensor, {lin['sparsity']:.4f} over the linear layers."
    )
    if "sparsity_bf16" in o:
        caption += f" Rounded to bf16, as bf16 storage would keep them: {o['sparsity_bf16']:.4f} overall."
    return _Drawn(fig, f"Sparsity by layer and module{_for_run(run)}", caption)


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
    layers = [int(x) for x in df.index]
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
        f"rounding."
    )
    return _Drawn(fig, f"Principal-weight overlap by layer{_for_run(run)}", caption)


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
    layers = [int(x) for x in df.index]
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
    bottom.plot(x, ang_max, color=COLORS["observed"], marker=marker, ms=3.5, lw=1.6, label="max over matrices")
    bottom.plot(x, ang_med, color=COLORS["median"], ls="--", marker=marker, ms=3, lw=1.2, label="median")
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("largest principal\nangle (degrees)", fontsize=8)
    bottom.set_xlabel("layer", fontsize=9)
    _layer_axis(bottom, layers)
    top.set_title(_t(f"Spectral drift and rotation per layer{_for_run(run)}"), fontsize=10, loc="left", pad=18)
    k = result.header.get("k", "?")
    k = "chosen per matrix, the k column of the CSV" if str(k).startswith("chosen per matrix") else k
    null = (
        " The equal-norm random null's ratios are in the tables (columns ending _r)."
        if result.with_null
        else " No random null was computed (run with --null random for one)."
    )
    caption = (
        f"Top: normalised spectral shift (NSS) of the singular values, the maximum and the median over each "
        f"layer's matrices{' (log scale)' if log else ''}. Bottom: the largest principal angle between the base's "
        f"and the fine-tune's top-k (k = {k}) singular subspaces, the larger of left and right, maximum and median "
        f"over the layer's matrices. Drift is not additive, so nothing is summed.{null}"
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
    modules = _module_order([str(m) for m in df.index])
    df = df.loc[modules]
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
# consistency


def _jaccard_matrix(result: ConsistencyResult) -> _Drawn | None:
    """Runs x runs: Jaccard of the update masks, the magnitude-matched baseline in each cell's text."""
    import numpy as np
    from matplotlib.colors import Normalize

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
    import matplotlib as mpl

    side = min(7.0, max(3.2, 1.0 + 0.9 * n))
    fig = _new(side, width=side + 1.4)
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#f0f0f0")
    off = [float(v) for v in jac[np.isfinite(jac)]]
    lo, hi = min(off), max(off)
    spread = hi - lo >= 0.005  # several distinct values: the colour spans them; else a fixed 0-1 scale
    norm = Normalize(max(0.0, lo - 0.1 * (hi - lo)), min(1.0, hi + 0.1 * (hi - lo))) if spread else Normalize(0, 1)
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
    scale = f", the scale spanning the pairs' range {lo:.3f} to {hi:.3f}" if spread else ", on a fixed 0–1 scale"
    caption = (
        f"Jaccard index |A∩B| / |A∪B| of the update masks of each pair of fine-tunes, over every compared entry "
        f"(colour{scale}); in brackets the magnitude-matched baseline, the Jaccard two runs would "
        f"reach by changing, at their own densities, entries picked at random among base weights of the same "
        f"magnitude. Mean off-diagonal: {f[0]:.4f}, against {f[1]:.4f} for random masks of the same densities and "
        f"{f[2]:.4f} magnitude-matched."
    )
    return _Drawn(fig, "Pairwise agreement of the update masks", caption)


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
