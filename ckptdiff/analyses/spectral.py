"""`ckptdiff spectral`: spectral drift and principal-subspace rotation per 2-D matrix (docs/metrics.md §3, §2b).

Same-shaped matrices are read in stacks sized by a memory budget and decomposed in batched calls
(``metrics.spectral``); everything else (1-D, integer, structural mismatches) is listed as not analysed.

Rollups per module type and per layer report the maximum and the median over matrices of NSS and of each
matrix's largest principal angle: drift is not additive, so no sum or parameter-weighted mean of it means
anything. The one weighted figure is ``nss_per_update``, a ratio of norms, averaged by parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ckptdiff import choices
from ckptdiff.analyses.base import (
    Report,
    Table,
    count,
    digest,
    expected_skips,
    figures_table,
    item_detail,
    non_finite_detail,
    once_per_key,
    pair_target,
    rollup_key,
    row_basics,
)
from ckptdiff.analyses.scopes import (
    SPECTRAL,
    WEDIN_UNSTABLE_DEG,
    angle_status,
    angles_ok,
    by_name,
    layer_label,
    rollup_by,
    scope_key,
)
from ckptdiff.engine.alignment import Aligned, Outcome
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.engine.shared import SvdRequest
from ckptdiff.errors import InputError
from ckptdiff.io.outputs import Output, standalone
from ckptdiff.io.resolve import SourceLike
from ckptdiff.metrics import linalg
from ckptdiff.metrics.linalg import workspace_bytes
from ckptdiff.metrics.mask import dtype_name
from ckptdiff.metrics.spectral import (
    INTRUDER_EPS,
    INTRUDER_K,
    SpectralResult,
    auto_k_max,
    null_seed,
    spectral_metrics_with_spectra,
)

FP32_WARNING = (
    "--precision fp32 is not precise enough for NSS and angles on small (RL-size, ~1e-5 relative) updates: "
    "an H100 fp32 run gave NSS 1.76e-5 against a true 3.06e-7; use fp64 for such checkpoints"
)

# Columns from metrics.spectral.SpectralResult, split into the always-present ones and the null's.
NULL_COLUMNS = [
    "nss_null",
    "angle_u_max_deg_null",
    "angle_v_max_deg_null",
    "nss_null_ratio",
    "angle_u_max_null_ratio",
    "angle_v_max_null_ratio",
    "intruders_null",
]
INT_COLUMNS = ["k", "k_stable", "intruders", "intruders_null"]
AUTO_K_RULE = (
    "chosen per matrix (--k not given): the largest k <= 64 whose gap passes the stability test "
    "(sigma_k - sigma_k+1 > sqrt(2) ||dW||_2, Wedin bound < 45 deg), else min(64, min(m, n) - 1); "
    "the k column says which"
)
DRAWS = "_null_draws"  # a row's key for every draw of the null: (nss_null, angle_u_max_deg_null, angle_v_...)
METRIC_COLUMNS = [f.name for f in fields(SpectralResult) if f.name not in NULL_COLUMNS and f.name != "more_nulls"]
LEAD_COLUMNS = [
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
]
LEAD_COLUMNS.append("linear")
TAIL_COLUMNS = ["analysed", "status", "outcome", "detail"]
# An unchanged matrix (ΔW = 0) has these at exactly 0; two SVDs of the same matrix give ~1e-13° of noise instead.
_ZERO_WHEN_UNCHANGED = ["nss", "sv_topk_max_rel_change", "angle_u_max_deg", "angle_v_max_deg"]
_ZERO_WHEN_UNCHANGED += ["angle_u_mean_deg", "angle_v_mean_deg"]
TOP_MATRICES = 10
TOP_LAYERS = 3


def columns(with_null: bool) -> list[str]:
    """Per-tensor CSV columns, in order (the null's only when a null was computed)."""
    return [*LEAD_COLUMNS, *METRIC_COLUMNS, *(NULL_COLUMNS if with_null else []), "angles", *TAIL_COLUMNS]


@dataclass(frozen=True)
class SpectralDriftResult:
    """Per-tensor spectral rows plus the header that says how they were made."""

    header: dict[str, str]
    rows: list[dict[str, object]] = field(default_factory=list)
    with_null: bool = False

    def __repr__(self) -> str:
        o = self.overall()
        return (
            f"<SpectralDriftResult: {int(o['matrices'])} matrices, NSS median {o['nss_median']:.3e}, max "
            f"{o['nss_max']:.3e}; .to_frame() .overall() .by() .most_rotated() .report()>"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per tensor (analysed or not), columns as in :func:`columns`."""
        df = pd.DataFrame(self.rows, columns=columns(self.with_null))
        df = df.astype({"layer": "Int64", "numel": "Int64"})
        metric = METRIC_COLUMNS + (NULL_COLUMNS if self.with_null else [])
        df = df.astype({c: "float64" for c in metric if c not in INT_COLUMNS})
        df = df.astype({c: "Int64" for c in metric if c in INT_COLUMNS})
        analysed = df["analysed"].astype(bool)
        cols = [df[c].tolist() for c in ("k", "shape", "wedin_bound_deg", "delta_spectral_norm")]
        df["angles"] = [  # whether the row's principal angles are a measurement (declarations.angle_status)
            angle_status(float(k), str(shape), float(wedin), float(d2)) if ok else ""
            for k, shape, wedin, d2, ok in zip(*cols, analysed, strict=True)
        ]
        return df

    def null_draws(self) -> pd.DataFrame:
        """Every draw of the equal-norm random null per analysed matrix (``--null-draws``; draw 0 is the one in
        the CSV's null columns): columns tensor, draw, nss_null, angle_u_max_deg_null, angle_v_max_deg_null, and
        the matrix's ``angles`` status. Empty without a null."""
        cols = ["tensor", "draw", "nss_null", "angle_u_max_deg_null", "angle_v_max_deg_null"]
        frame = self.to_frame()
        status = dict(zip(frame["tensor"], frame["angles"], strict=True))
        out: list[tuple[object, ...]] = []
        for row in self.rows:
            if row.get("analysed") and DRAWS in row:
                draws: list[tuple[float, float, float]] = row[DRAWS]  # type: ignore[assignment]
                out += [(row["tensor"], d, *figs) for d, figs in enumerate(draws)]
        df = pd.DataFrame(out, columns=cols)
        df["angles"] = [status[t] for t in df["tensor"]]
        return df

    def analysed(self) -> pd.DataFrame:
        """The 2-D float matrices that were decomposed: the population of every rollup."""
        df = self.to_frame()
        return df[df["analysed"].astype(bool)]

    def _stats(self, df: pd.DataFrame) -> dict[str, float]:
        """The scope figures: the declared worst matrix (max) beside the median, and the weighted nss_per_update."""
        metrics = by_name(SPECTRAL)
        out: dict[str, float] = {"matrices": len(df), "params": int(df["numel"].sum())}
        # Angles: the worst stable matrix (declarations.angles_ok); medians over every matrix with k < min(m, n)
        # (an unstable angle is one value among many there, a trivial one is 0 by construction).
        nontrivial = df[df["angles"] != "trivial_k"] if "angles" in df.columns else df
        for col, label in (("nss", "nss"), ("angle_u_max_deg", "angle_u_deg"), ("angle_v_max_deg", "angle_v_deg")):
            out[f"{label}_max"] = metrics[col].over(df)
            sub = df if col == "nss" else nontrivial
            out[f"{label}_median"] = float(sub[col].median()) if len(sub) else math.nan
        out["nss_per_update"] = metrics["nss_per_update"].over(df)
        out["intruders"] = metrics["intruders"].over(df)
        if self.with_null:
            out["intruders_null"] = metrics["intruders_null"].over(df)
            for col in ("nss_null_ratio", "angle_u_max_null_ratio", "angle_v_max_null_ratio"):
                sub = df if col == "nss_null_ratio" else nontrivial
                out[f"{col}_median"] = float(sub[col].median()) if len(sub) else math.nan
        return out

    def overall(self) -> dict[str, float]:
        """Max and median of NSS and largest angles over all matrices, parameter-weighted mean of nss_per_update."""
        return self._stats(self.analysed())

    def linear_only(self) -> dict[str, float]:
        """The same figures over the 2-D matrices inside transformer blocks."""
        df = self.analysed()
        return self._stats(df[df["linear"].astype(bool)])

    @once_per_key
    def by(self, key: str) -> pd.DataFrame:
        """Rollup per ``layer`` or ``module``: max and median of NSS and angles, weighted nss_per_update."""
        df = self.analysed()
        if rollup_key(key, ("layer", "module")) == "layer":
            df = df.dropna(subset=["layer"])
        out = rollup_by(df, scope_key(df, key), self._stats)
        return out.astype({"matrices": "int64", "params": "int64"}) if len(out) else out

    def most_rotated(self, n: int = TOP_MATRICES) -> pd.DataFrame:
        """The ``n`` matrices with the largest principal angle (left or right), among those whose angles are a
        measurement (``angles`` ok: k < min(m, n) and a Wedin bound below 45°)."""
        df = self.analysed()
        df = df[angles_ok(df)]
        cols = ["tensor", "shape", "k", "nss", "angle_u_max_deg", "angle_v_max_deg", "gap_k", "wedin_bound_deg"]
        cols += ["delta_rel_fro", "nss_per_update"]
        if self.with_null:
            cols += ["nss_null_ratio", "angle_u_max_null_ratio", "angle_v_max_null_ratio"]
        worst = df[["angle_u_max_deg", "angle_v_max_deg"]].max(axis=1)
        return df.assign(_w=worst).sort_values("_w", ascending=False, kind="stable")[cols].head(n)

    def structural(self) -> pd.DataFrame:
        """Tensors that were not analysed, and why."""
        df = self.to_frame()
        return df.loc[~df["analysed"].astype(bool), ["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape"]]

    def _summary(self) -> list[str]:
        df = self.analysed()
        o = self.overall()
        h = self.header
        if df.empty:
            return ["No 2-D floating-point matrix was comparable: nothing to decompose."]
        if (df["delta_rel_fro"] == 0).all():  # angles of two SVDs of one matrix are rounding noise: say so instead
            n = count(len(df), "analysed matrix", "analysed matrices")
            return [f"No matrix changed (ΔW = 0 for all {n}): spectral drift and principal angles are 0."]
        nss = df["nss"].to_numpy(dtype=float)
        worst_nss = str(df["tensor"].iloc[int(np.nanargmax(nss))]) if np.isfinite(nss).any() else "—"
        lines = [
            f"Spectral drift over {count(int(o['matrices']), 'matrix', 'matrices')} ({int(o['params']):,} parameters), "
            f"{h['precision']}, k = {self._k_words(df)}: NSS median {o['nss_median']:.3e}, "
            f"max {o['nss_max']:.3e} ({worst_nss}).",
            *self._angle_sentences(df, o),
        ]
        if math.isnan(o["nss_per_update"]):
            lines.append("No matrix changed: drift per unit of update is undefined.")
        else:
            lines.append(
                f"Drift per unit of update, NSS / (‖ΔW‖_F/‖W0‖_F), parameter-weighted: {o['nss_per_update']:.4g} "
                "(at most 1; 1 means the whole update went into the singular values, e.g. a rescaling)."
            )
        lines.append(self._intruder_sentence(df, o))
        if self.with_null:
            lines.append(self._null_sentence(df[df["angles"] != "trivial_k"]))
        return lines

    def _k_words(self, df: pd.DataFrame) -> str:
        """The summary's k: the number given, or the per-matrix choice with its median."""
        if not self.header.get("k", "").startswith("chosen per matrix"):
            return str(self.header.get("k", "?"))
        ks = df["k"].dropna().astype(int)
        return f"per matrix ({ks.min()}..{ks.max()}, median {int(ks.median())}; --k not given)" if len(ks) else "auto"

    def _k_hint(self, df: pd.DataFrame) -> str:
        """When the k given leaves no stable matrix: the k that would work (from each matrix's k_stable)."""
        if self.header.get("k", "").startswith("chosen per matrix") or "k_stable" not in df.columns:
            return ""
        fits = df["k_stable"].dropna().astype(int)
        fits = fits[fits > 0]
        if fits.empty:
            return " No k <= 64 has a stable gap in any matrix: the update is as large as every gap of the spectrum."
        return (
            f" At k = {self.header['k']} no gap is stable; {count(len(fits), 'matrix', 'matrices')} have a stable gap "
            f"at a smaller k (k_stable column; median {int(fits.median())}, up to {fits.max()}): pass "
            f"--k {int(fits.median())}, or leave --k out to choose k per matrix."
        )

    def _intruder_sentence(self, df: pd.DataFrame, o: dict[str, float]) -> str:
        """Intruder dimensions over the run, beside the equal-norm null's count when there is one."""
        n = int(o["intruders"]) if not math.isnan(o["intruders"]) else 0
        hit = int((df["intruders"].fillna(0) > 0).sum())
        what = f"Intruder dimensions ({self.header.get('intruders', '')}): {n:,} in {count(hit, 'matrix', 'matrices')}"
        if self.with_null:
            return f"{what}; an equal-norm random update gives {int(o['intruders_null']):,}."
        return f"{what} (--null random adds the count an equal-norm random update gives)."

    def _angle_sentences(self, df: pd.DataFrame, o: dict[str, float]) -> list[str]:
        """Largest stable angles, medians, which layers rotate most, and which angles are left out and why."""
        flags = df["angles"].value_counts()
        ok, trivial, unstable = (int(flags.get(f, 0)) for f in ("ok", "trivial_k", "unstable_gap"))
        if trivial == len(df):
            return [
                f"Principal angles are undefined for every matrix: k = min(m, n) for all {len(df)}, so the top-k "
                "subspace is the whole space (0° by construction); pass a smaller --k."
            ]
        out = []
        medians = (
            f"medians over the {count(len(df) - trivial, 'matrix', 'matrices')} with k < min(m, n): "
            f"{o['angle_u_deg_median']:.4g}° left, {o['angle_v_deg_median']:.4g}° right"
        )
        if ok:
            out.append(
                f"Largest principal angle between top-k subspaces: {o['angle_u_deg_max']:.4g}° left, "
                f"{o['angle_v_deg_max']:.4g}° right (over the {count(ok, 'matrix', 'matrices')} whose angles are "
                f"stable); {medians}."
            )
            layers = self.by("layer")
            if len(layers):
                rot = layers[["angle_u_deg_max", "angle_v_deg_max"]].max(axis=1).dropna()
                rot = rot[rot > 0]  # a layer whose matrices did not change does not rotate
                rot = rot.sort_values(ascending=False, kind="stable").head(TOP_LAYERS)
                if len(rot):
                    named = ", ".join(f"{layer_label(i)} ({v:.4g}°)" for i, v in rot.items())
                    out.append(f"{'Layers that rotate' if len(rot) > 1 else 'The layer that rotates'} most: {named}.")
        else:
            out.append(f"No matrix has stable principal angles; {medians}.{self._k_hint(df)}")
        if trivial or unstable:
            parts = []
            if trivial:
                parts.append(
                    f"{count(trivial, 'matrix', 'matrices')} with k = min(m, n), whose top-k subspace is the whole "
                    "space (0° by construction)"
                )
            if unstable:
                parts.append(
                    f"{unstable} with an unstable gap, Wedin bound ≥ {WEDIN_UNSTABLE_DEG:g}° (the update is as large "
                    "as σ_k − σ_{k+1}, so a large angle can be directions trading places)"
                )
            out.append(
                f"Left out of the largest angles and the rankings: {'; '.join(parts)}. The angles column says which."
            )
        return out

    def _null_sentence(self, df: pd.DataFrame) -> str:
        cols = {
            "NSS": "nss_null_ratio",
            "left angle": "angle_u_max_null_ratio",
            "right angle": "angle_v_max_null_ratio",
        }
        ratios = {label: df[col].dropna() for label, col in cols.items()}
        if all(r.empty for r in ratios.values()):
            return "Equal-norm random null: no matrix changed, so no ratio is defined."
        medians = {label: float(r.median()) for label, r in ratios.items()}
        meds = ", ".join(f"{label} {v:.3g}" for label, v in medians.items())
        below = ", ".join(f"{label} {int((r < 1).sum())}/{len(r)}" for label, r in ratios.items())
        drift = medians["NSS"] < 1
        rotation = medians["left angle"] < 1 and medians["right angle"] < 1
        same = "than an equal-norm random update would cause"
        if drift and rotation:
            verdict = (
                f"both the spectral drift and the rotation are smaller {same}: the update preserves the spectrum and "
                "the top-k subspaces beyond what its size implies"
            )
        elif rotation:
            verdict = (
                f"the rotation is smaller {same}, the spectral drift is not: the update preserves the top-k "
                "subspaces beyond what its size implies, not the spectrum"
            )
        elif drift:
            verdict = (
                f"the spectral drift is smaller {same}, the rotation is not: the update preserves the spectrum "
                "beyond what its size implies, not the top-k subspaces"
            )
        else:
            verdict = (
                f"neither the spectral drift nor the rotation is smaller {same}: the update preserves no more "
                "structure than its size implies"
            )
        said = (
            f"Against an equal-norm random null (seed {self.header.get('seed', '?')}), median ratios: {meds}; "
            f"matrices below 1: {below}. So {verdict}."
        )
        return said + self._draws_sentence(df)

    def _draws_sentence(self, df: pd.DataFrame) -> str:
        """With --null-draws N: in how many draws the median ratios fall on the same sides of 1 as in the first."""
        draws = self.null_draws()
        n = int(draws["draw"].nunique()) if len(draws) else 0
        if n <= 1:
            return " One draw of the null: another --seed can move it (--null-draws N counts how many draws agree)."
        mine = df.set_index("tensor")
        readings = []
        for _, d in draws.groupby("draw"):  # in draw order; every draw read the same way, the first included
            d = d.set_index("tensor")
            nss = (mine["nss"] / d["nss_null"]).dropna().median()
            u = (mine["angle_u_max_deg"] / d["angle_u_max_deg_null"]).dropna().median()
            v = (mine["angle_v_max_deg"] / d["angle_v_max_deg_null"]).dropna().median()
            readings.append((bool(nss < 1), bool(u < 1 and v < 1)))
        agree = sum(r == readings[0] for r in readings)
        seed = int(self.header.get("seed", 0))
        return f" The same reading in {agree} of {n} draws of the null (seeds {seed} to {seed + n - 1})."

    def report(self) -> Report:
        """The report the CLI renders."""
        overall = figures_table({"all matrices": self.overall(), "linear layers": self.linear_only()})
        note = (
            "max / median over matrices of NSS and of each matrix's largest principal angle (degrees); drift is not "
            "additive, so no sums. Largest angles over the matrices whose angles are stable (angles column: ok), "
            "medians over those with k < min(m, n). nss_per_update is weighted by parameter count."
        )
        legend = (
            "nss_max, nss_med: largest and median NSS; u_max, v_max: largest left / right angle; u_med, v_med: "
            "median angles"
        )
        view = {"nss_max": "nss_max", "nss_median": "nss_med", "angle_u_deg_max": "u_max"}
        view |= {"angle_u_deg_median": "u_med", "angle_v_deg_max": "v_max", "angle_v_deg_median": "v_med"}
        rotated_view = {"angle_u_max_deg": "u", "angle_v_max_deg": "v", "wedin_bound_deg": "wedin", "nss": "nss"}
        short = (
            "u, v: largest left / right principal angle (degrees), matrices with stable angles only; wedin: the "
            "Wedin bound arcsin(‖ΔW‖₂ / γ_k), degrees."
        )
        if self.with_null:
            view = {"nss_median": "nss_med", "angle_u_deg_max": "u_max", "angle_v_deg_max": "v_max"}
            view |= {"nss_null_ratio_median": "nss_r", "angle_u_max_null_ratio_median": "u_r"}
            view["angle_v_max_null_ratio_median"] = "v_r"
            legend = (
                "nss_med: median NSS; u_max, v_max: largest left / right angle; *_r: median ratio to the "
                "equal-norm random null"
            )
            rotated_view = {"angle_u_max_deg": "u", "angle_v_max_deg": "v", "angle_u_max_null_ratio": "u_r"}
            rotated_view |= {"angle_v_max_null_ratio": "v_r", "wedin_bound_deg": "wedin"}
            short += " *_r: ratio to the equal-norm random null."
        legend += ". All columns: --json, --rollups-csv."
        rotated = self.most_rotated().set_index("tensor").drop(columns=["shape", "k", "gap_k"])
        tables = [
            Table("Overall", overall, note),
            Table("Per module type", self.by("module").drop(columns="params", errors="ignore"), note, view, legend),
            Table("Per layer", self.by("layer").drop(columns="params", errors="ignore"), "", view, legend),
            Table("Most rotated matrices", rotated, short, rotated_view),
        ]
        df = self.to_frame()
        findings, notes = digest(df, None, expected_skips(df))  # the rule every command shares
        findings = findings[["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape"]]
        return Report("ckptdiff spectral", self.header, self._summary() + notes, tables, df, findings)


# ---------------------------------------------------------------------------------------------
# Running it


def _not_analysed(item: Aligned) -> str:
    """Why a tensor has no spectral row: the structural detail, or what kind of tensor it is."""
    if not item.comparable:  # the structural note, worded as in every command (analyses.base.item_detail)
        return item_detail(item) or item.status.replace("_", " ")
    if not item.is_float:
        return "integer/bool: no spectrum"
    ndim = len(item.base.shape)
    if ndim != 2:
        return f"{ndim}-D: no spectrum (2-D only)"
    return "empty matrix"


def _to_compute(stack: torch.Tensor, targets: Sequence[torch.dtype], dt: torch.dtype) -> torch.Tensor:
    """(b, m, n) stack in the compute dtype, matrix i first rounded to targets[i] (as torch rounds: RNE)."""
    out = torch.empty(stack.shape, dtype=dt, device=stack.device)  # (b, m, n)
    for i, target in enumerate(targets):
        out[i].copy_(stack[i].to(target))
    return out


def _per_matrix_bytes(shape: tuple[int, ...], in_dtype: torch.dtype, dt: torch.dtype, device: str, null: bool) -> int:
    """Peak bytes one matrix costs in a batch: the SVD workspace plus the metric's extra (m, n) arrays.

    spectral_metrics holds about five (m, n) arrays in the compute dtype besides the SVD (W0, W1, ΔW, the
    second side's U/Vh), two more for the null (R and W0 + R), and the second input stack in its storage dtype.
    """
    m, n = int(shape[0]), int(shape[1])
    e = torch.empty((), dtype=dt).element_size()
    e_in = torch.empty((), dtype=in_dtype).element_size()
    extra = (5 + (2 if null else 0)) * e * m * n + e_in * m * n
    return workspace_bytes((m, n), in_dtype, dt, work="svd", device_type=device) + extra


def svd_routes(routes: dict[str, str]) -> str:
    """The header's account of how the top-k vectors were found, per side: matrices per route, fallbacks said.

    ``routes`` maps 'base<TAB>tensor' and 'fine-tune<TAB>tensor' to the decomposition's label.
    """
    counts: dict[tuple[str, str], int] = {}
    for key, label in routes.items():
        side = key.split("\t", 1)[0]
        kind = (side, "checked" if label.startswith("checked") else label)
        counts[kind] = counts.get(kind, 0) + 1
    words = {
        "exact": "exact SVD",
        "checked": "randomized top-k + fp64 Rayleigh-Ritz, passed the Wedin residual check",
        "exact (fallback)": "exact SVD after the fast path failed its check",
        "exact (gap)": "exact SVD (spectrum too flat at k for the fast path to converge)",
    }
    parts = []
    for side in ("base", "fine-tune"):
        mine = sorted((kind, n) for (s, kind), n in counts.items() if s == side)
        if mine:
            parts.append(f"{side}: " + ", ".join(f"{n} {words.get(kind, kind)}" for kind, n in mine))
    return "; ".join(parts)


def write_spectra(path: str | Path | Output, spectra: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save singular values as safetensors atomically (see :mod:`ckptdiff.io.outputs`): a path is renamed into place
    at once, an :class:`~ckptdiff.io.outputs.Output` of a caller's set when the set commits."""
    from safetensors.torch import save

    out = standalone(path, "save_spectra")
    assert out is not None
    try:
        out.write(save({k: v.contiguous() for k, v in spectra.items()}, metadata=metadata))
    except BaseException:
        out.discard()
        raise


class SpectralAnalysis(Analysis):
    """Spectral drift and top-k rotation per 2-D matrix of one base/fine-tune pair, in batched SVDs."""

    name = "spectral"
    state_fields = ("results", "nonfinite", "spectra", "routes")  # routes: "side\ttensor" -> how it was decomposed

    def __init__(
        self,
        *,
        k: int | None = None,
        precision: str = "fp64",
        null: str | bool = "none",
        seed: int = 0,
        as_dtype: torch.dtype | str | None = None,
        save_spectra: str | Path | Output | None = None,
        svd: str = "auto",
        intruder_k: int = INTRUDER_K,
        intruder_eps: float = INTRUDER_EPS,
        intruder_base_k: int | None = None,
        null_draws: int = 1,
        sides: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__(sides)
        self.null_draws = choices.positive_int(null_draws, "--null-draws")
        self.intruder_k = choices.positive_int(intruder_k, "--intruder-k")
        self.intruder_eps = choices.unit_interval(intruder_eps, "--intruder-eps")
        base_k = intruder_base_k
        self.intruder_base_k = None if base_k is None else choices.positive_int(base_k, "--intruder-base-k")
        self.dt = choices.precision_dtype(precision)
        self.k = None if k is None else choices.k_value(k)  # None: chosen per matrix (AUTO_K_RULE)
        self.svd = choices.svd_method(svd)
        self.routes: dict[str, str] = {}  # "base|fine-tune<TAB>tensor" -> how that side's top-k vectors were found
        self.with_null, self.as_t = choices.null_kind(null), choices.as_dtype(as_dtype)
        if self.null_draws > 1 and not self.with_null:
            raise InputError("--null-draws counts draws of the random null: add --null random")
        self.precision, self.seed = precision, seed
        self.save_spectra = standalone(save_spectra, "save_spectra")  # the caller checks a path against its inputs
        self.items: list[Aligned] = []
        self.results: dict[str, SpectralResult] = {}
        self.nonfinite: set[str] = set()
        self.spectra: dict[str, torch.Tensor] = {}
        self.device_type = "cpu"

    def form(self, item: Aligned) -> Form | None:
        return Form.MATRIX if item.is_matrix else None

    def matrix_bytes(self, item: Aligned) -> int:
        widest = max((i.dtype for i in item.infos if i is not None), key=lambda x: x.itemsize).torch
        return _per_matrix_bytes(item.base.shape, widest, self.dt, self.device_type, self.with_null)

    def cost(self, item: Aligned) -> float:
        """Seconds for the two full SVDs (base and fine-tune) of one matrix (see linalg.svd_seconds)."""
        m, n = item.base.shape
        return 2 * linalg.svd_seconds(m, n, min(m, n), "exact")

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)
        self.device_type = run.device.type

    def need(self, side: int, item: Aligned) -> linalg.Need:
        """Every singular value and the top-k vectors of a side, in --precision, by --svd; the left vectors the
        intruder count needs too (the base: its --intruder-base-k, default all; the fine-tune: --intruder-k)."""
        p = min(item.base.shape)
        more = (self.intruder_base_k or p) if side == 0 else self.intruder_k
        kv = auto_k_max(p) if self.k is None else min(self.k, p)
        left = min(p, max(kv, more))
        return linalg.Need(values=True, left=left, right=kv, dtype=self.dt, method=self.svd)

    def svd_requests(self, item: Aligned) -> Sequence[SvdRequest]:
        rounding = pair_target(item, self.as_t)  # both sides are rounded to the comparison dtype first
        return [SvdRequest(k, self.need(i, item), rounding) for i, k in enumerate(self.sides)]

    def on_batch(self, items: Sequence[Aligned], stacks: tuple[torch.Tensor, ...]) -> None:
        s0, s1 = stacks
        targets = [pair_target(it, self.as_t) for it in items]
        a0, a1 = _to_compute(s0, targets, self.dt), _to_compute(s1, targets, self.dt)  # (b, m, n) each
        del s0, s1, stacks
        finite = [f0 and f1 for f0, f1 in zip(linalg.finite_rows(a0), linalg.finite_rows(a1), strict=True)]
        keep = [i for i, ok in enumerate(finite) if ok]
        self.nonfinite.update(it.name for it, ok in zip(items, finite, strict=True) if not ok)
        if not keep:
            return
        if len(keep) < len(items):
            idx = torch.tensor(keep, device=a0.device)
            a0, a1 = a0.index_select(0, idx), a1.index_select(0, idx)
        kept = [items[i] for i in keep]
        seeds = [null_seed(self.seed, it.name) for it in kept] if self.with_null else None
        more = [[null_seed(self.seed + d, it.name) for it in kept] for d in range(1, self.null_draws)]
        assert self.svds is not None, "the pipeline hands every matrix analysis the batch's shared SVDs"
        got = [self.svds.get(k, self.need(i, items[0]), keep, targets[0]) for i, k in enumerate(self.sides)]
        svds = tuple(g[:3] for g in got)
        for j, it in enumerate(kept):
            for side, g in zip(("base", "fine-tune"), got, strict=True):
                self.routes[f"{side}\t{it.name}"] = g[3][j]
        res, sig0, sig1 = spectral_metrics_with_spectra(
            a0,
            a1,
            self.k,
            dtype=self.dt,
            null_seeds=seeds,
            more_null_seeds=more,
            svds=svds,  # type: ignore[arg-type]
            intruder_k=self.intruder_k,
            intruder_eps=self.intruder_eps,
            intruder_base_k=self.intruder_base_k,
        )
        del a0, a1
        for i, (it, r) in enumerate(zip(kept, res, strict=True)):
            self.results[it.name] = r
            if self.save_spectra is not None:
                self.spectra[f"{it.name}.sigma_base"] = sig0[i].to("cpu", torch.float64)
                self.spectra[f"{it.name}.sigma_ft"] = sig1[i].to("cpu", torch.float64)

    def abort(self) -> None:
        if self.save_spectra is not None:
            self.save_spectra.discard()

    def finish(self, run: Run) -> SpectralDriftResult:
        params: dict[str, object] = {
            "k": AUTO_K_RULE if self.k is None else self.k,
            "precision": self.precision,
            "null": "random" if self.with_null else "none",
            "svd": self.svd,
            "intruders": f"top {self.intruder_k} fine-tune left singular vectors with max |cos| < "
            f"{self.intruder_eps:g} against the base's "
            + ("full left singular basis" if self.intruder_base_k is None else f"top {self.intruder_base_k}"),
        }
        if self.routes:
            params["svd_routes"] = svd_routes(self.routes)
        if self.with_null:
            params["seed"] = self.seed
        if self.null_draws > 1:
            params["null_draws"] = f"{self.null_draws} (seeds {self.seed} to {self.seed + self.null_draws - 1})"
        params["as"] = dtype_name(self.as_t) if self.as_t is not None else "native"
        params["batch_budget_gib"] = f"{run.budget / 1024**3:.3g}"
        if self.dt == torch.float32:
            params["warning"] = FP32_WARNING
        head = run.header("spectral", self.sides, None, **params)
        rows = [
            _row(it, self.results.get(it.name), it.name in self.nonfinite, self.as_t, self.with_null)
            for it in self.items
        ]
        if self.save_spectra is not None:
            write_spectra(self.save_spectra, self.spectra, head)
        return SpectralDriftResult(head, rows, self.with_null)


def spectral(
    base: SourceLike,
    ft: SourceLike,
    *,
    k: int | None = None,
    precision: str = "fp64",
    null: str | bool = "none",
    seed: int = 0,
    as_dtype: torch.dtype | str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    batch_budget: float | None = None,
    save_spectra: str | Path | Output | None = None,
    svd: str = "auto",
    intruder_k: int = INTRUDER_K,
    intruder_eps: float = INTRUDER_EPS,
    intruder_base_k: int | None = None,
    null_draws: int = 1,
    progress: bool = True,
    merged_dtype: torch.dtype | str | None = None,
) -> SpectralDriftResult:
    """Spectral drift of every 2-D matrix of ``ft`` against ``base``, in batched SVDs within a memory budget.

    ``k`` top singular directions for the angles; None (the default) chooses k per matrix so that its angles are
    measurable (see AUTO_K_RULE). ``precision`` is the SVD dtype (fp64 by default: fp32 is too coarse for RL-size
    updates). ``null="random"`` adds the equal-norm Gaussian null, seeded per matrix from ``seed`` and the tensor
    name; ``null_draws`` > 1 draws it that many times (seeds ``seed`` to ``seed + null_draws - 1``, one more SVD per
    matrix each), so that a verdict against the null says how many draws support it. ``as_dtype`` rounds both
    sides to that storage dtype first. ``batch_budget`` is in GiB (default: half the free GPU memory, or 2 GiB on
    the CPU). ``save_spectra`` writes σ of both sides per matrix, fp64, to a
    safetensors file.
    ``svd="auto"`` finds the top-k vectors of large matrices by the guarded fast path (every singular value from
    svdvals, top-k vectors by randomized subspace iteration with an fp64 Rayleigh-Ritz step, checked per matrix
    by the Wedin residual bound, exact SVD where the check fails; the header counts each route); ``"exact"``
    decomposes every matrix in full.
    """
    spectra_out = standalone(save_spectra, "save_spectra", [base, ft])  # checked now, before any read
    analysis = SpectralAnalysis(
        k=k,
        precision=precision,
        null=null,
        seed=seed,
        as_dtype=as_dtype,
        save_spectra=spectra_out,
        svd=svd,
        intruder_k=intruder_k,
        intruder_eps=intruder_eps,
        intruder_base_k=intruder_base_k,
        null_draws=null_draws,
    )
    opts: dict[str, Any] = {"include": include, "exclude": exclude, "device": device, "batch_budget": batch_budget}
    opts["merged_dtype"] = merged_dtype  # an adapter FT: what its merged weights are stored as
    return run_pair(base, ft, analysis, label="decomposing", progress=progress, **opts)  # type: ignore[no-any-return]


def _row(
    item: Aligned, result: SpectralResult | None, nonfinite: bool, as_t: torch.dtype | None, with_null: bool
) -> dict[str, object]:
    row = row_basics(item)
    row["compared_as"] = dtype_name(pair_target(item, as_t)) if item.comparable and item.is_float else ""
    row["analysed"] = result is not None
    if result is not None:
        values = asdict(result)
        if result.delta_rel_fro == 0:  # W1 = W0: no drift and no rotation, whatever rounding the two SVDs made
            values |= dict.fromkeys(_ZERO_WHEN_UNCHANGED, 0.0)
        row.update({c: values[c] for c in METRIC_COLUMNS + (NULL_COLUMNS if with_null else [])})
        if with_null:  # every draw of the null, the first one's being the columns above (not a CSV column)
            first = (result.nss_null, result.angle_u_max_deg_null, result.angle_v_max_deg_null)
            row[DRAWS] = [first, *result.more_nulls]
        row["detail"] = item_detail(item)
        row["outcome"] = Outcome.ANALYSED.value
        return row
    row.update({c: math.nan for c in METRIC_COLUMNS + (NULL_COLUMNS if with_null else [])})
    row["detail"] = non_finite_detail(consequence="not analysed") if nonfinite else _not_analysed(item)
    row["outcome"] = (Outcome.NON_FINITE if nonfinite else Outcome.NOT_ANALYSED).value
    return row
