"""`ckptdiff principal-overlap`: does the update avoid or target the base's principal weights? (docs/metrics.md §2, §2b)

Per 2-D float matrix, on the device: the update mask (§1), the top-k SVD of W0 (batched over same-shape matrices
within a memory budget), the principal and low-magnitude masks, their overlaps with the update against the random
and the magnitude-matched baselines, and the update's energy in the principal subspace. Only counts and floats come
back to the host, plus the bit-packed masks when ``save_masks`` asks for them.

Mask files (``save_masks``) are safetensors with three uint8 tensors per matrix, ``<tensor>.principal``,
``<tensor>.low`` and ``<tensor>.update``, each the (m, n) bool mask bit-packed along rows exactly as
``numpy.packbits(mask, axis=-1, bitorder="big")`` does: shape (m, ceil(n / 8)), row-major, the first column in the
most significant bit, each row padded with zero bits. The metadata key ``shapes`` (JSON) gives every tensor's
original (m, n); unpack with ``numpy.unpackbits(x, axis=-1, count=n).astype(bool)`` or :func:`load_masks`.
The file is written to a temporary name and renamed at the end: a failed run leaves no partial file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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
from ckptdiff.analyses.scopes import PRINCIPAL, figures, rollup_by, scope_key
from ckptdiff.engine.alignment import Aligned, Outcome
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.engine.shared import SharedSVD, SvdRequest
from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.outputs import Output, standalone
from ckptdiff.io.resolve import SourceLike
from ckptdiff.metrics import linalg
from ckptdiff.metrics.mask import CompareMode, compare_mode, dtype_name, update_mask, widen_fp8, widened
from ckptdiff.metrics.numeric import OVERLAP_BAND, against_one, ratio
from ckptdiff.metrics.principal import PrincipalMasks, PrincipalResult, principal_metrics_with_masks
from ckptdiff.runtime import distributed

MASK_FORMAT = "ckptdiff.principal-masks/1"
MASK_PACKING = (
    "uint8, numpy.packbits(mask, axis=-1, bitorder='big'): shape (m, ceil(n/8)), row-major, rows zero-padded; "
    "unpack with numpy.unpackbits(x, axis=-1, count=n)"
)

_RESULT_FIELDS = [f.name for f in fields(PrincipalResult)]
_COUNTS = [
    "layer",
    "k",
    "numel",
    "changed",
    "principal_size",
    "low_size",
    "principal_not_low_size",
    "changed_principal",
    "changed_low",
    "changed_principal_not_low",
]
# Per-tensor CSV columns, in order: row basics, every PrincipalResult field, then flags.
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
    *_RESULT_FIELDS,
    "linear",
    "analysed",
    "status",
    "outcome",
    "detail",
]
# Rollup columns shown in the per-module / per-layer tables (by() returns them all).
_SHOWN = [
    "tensors",
    "changed",
    "overlap_principal",
    "ratio_principal",
    "ratio_principal_magnitude",
    "overlap_low",
    "ratio_low",
    "ratio_low_magnitude",
    "energy_principal",
    "energy_principal_random",
]
# The terminal's columns of the per-module / per-layer tables, under short headers (see report.Table.view).
_VIEW = {
    "overlap_principal": "ov_P",
    "ratio_principal": "P/rand",
    "ratio_principal_magnitude": "P/mag",
    "overlap_low": "ov_low",
    "ratio_low_magnitude": "low/mag",
    "energy_principal": "E_k",
    "energy_principal_random": "E_k_rand",
}
_LEGEND = (
    "ov_P, ov_low: overlap of the update with the principal and the low-magnitude mask; P/rand, P/mag, low/mag: "
    "overlap over its random and magnitude-matched baselines; E_k: update energy in the top-k subspace (E_k_rand: "
    "an isotropic random update's). All columns: --json, --rollups-csv."
)


def rollup(df: pd.DataFrame) -> dict[str, float]:
    """Figures of a set of analysed rows: every declared principal-overlap metric (see :mod:`ckptdiff.analyses.scopes`).

    overlap = Σ|M•∩M| / Σ|M|; random baseline = Σ(|M|·|M•|/numel) / Σ|M|; magnitude-matched baseline
    = Σ(|M|·baseline_•_magnitude) / Σ|M|; each ratio = Σ|M•∩M| over the matching expected intersection;
    energies weighted by ‖ΔW‖_F².
    """
    return {"tensors": len(df), **figures(df, PRINCIPAL)}


def _verdict(value: float) -> str:
    words = {"below": "avoids", "above": "targets", "within": "neutral", "undefined": "undefined"}
    return words[against_one(value, OVERLAP_BAND)]


def principal_sentence(o: dict[str, float], alpha: float) -> str:
    """One line: avoids / targets the principal weights, against random and against the magnitude-matched control."""
    ov, base, r = o["overlap_principal"], o["baseline_principal"], o["ratio_principal"]
    mb, rm = o["baseline_principal_magnitude"], o["ratio_principal_magnitude"]
    naive, matched = _verdict(r), _verdict(rm)
    numbers = (
        f"overlap {ov:.3f} vs α {alpha:.2f} (random baseline {base:.3f}, ratio {r:.2f}); "
        f"vs magnitude-matched {mb:.3f} (ratio {rm:.2f})"
    )
    noun = {"avoids": "avoidance", "targets": "targeting"}
    if naive in noun and matched == "neutral":
        tail = f"the {noun[naive]} is explained by update size and bf16 rounding"
    elif naive in noun and matched == naive:
        tail = f"the {noun[naive]} survives the magnitude-matched control"
    elif naive in noun and matched in noun:
        tail = f"against weights of the same magnitude it {matched.removesuffix('s')}s them instead"
    elif naive == "neutral" and matched in noun:
        tail = f"no effect against random, but against weights of the same magnitude it {matched} them"
    else:
        tail = "no preference either way"
    verb = {"avoids": "avoids", "targets": "targets", "neutral": "neither avoids nor targets"}.get(naive)
    head = f"The update {verb} the principal weights" if verb else "Principal overlap is undefined"
    return f"{head}: {numbers}: {tail} (ratios within ±{OVERLAP_BAND:.0%} of 1 count as no effect)."


@dataclass(frozen=True)
class PrincipalOverlapResult:
    """Per-tensor principal-overlap rows plus the header that says how they were made."""

    header: dict[str, str]
    alpha: float
    rows: list[dict[str, object]] = field(default_factory=list)

    def __repr__(self) -> str:
        o = self.overall()
        return (
            f"<PrincipalOverlapResult: {int(o['tensors'])} matrices, overlap {o['overlap_principal']:.3f} "
            f"(ratio {o['ratio_principal']:.2f} to random, {o['ratio_principal_magnitude']:.2f} to magnitude-matched); "
            ".to_frame() .overall() .by() .report()>"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per tensor (analysed or not), columns as in :data:`COLUMNS`; metric columns NA when not analysed."""
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        return df.astype({c: "Int64" for c in _COUNTS})

    def analysed(self) -> pd.DataFrame:
        """The 2-D float matrices that were analysed: the population of every rollup."""
        df = self.to_frame()
        return df[df["analysed"].astype(bool)]

    def overall(self) -> dict[str, float]:
        """Rollup over every analysed matrix (see :func:`rollup`)."""
        return rollup(self.analysed())

    def linear_only(self) -> dict[str, float]:
        """Rollup over the analysed matrices inside transformer blocks."""
        df = self.analysed()
        return rollup(df[df["linear"].astype(bool)])

    @once_per_key
    def by(self, key: str) -> pd.DataFrame:
        """Rollup per ``module`` or ``layer``, one row per group (see :func:`rollup`); per (stack, module) and
        (stack, layer) when the checkpoint has several stacks."""
        df = self.analysed()
        if rollup_key(key, ("module", "layer")) == "layer":
            df = df.dropna(subset=["layer"])
        if df.empty:
            return pd.DataFrame()
        out = rollup_by(df, scope_key(df, key), rollup)
        return out.astype({c: "int64" for c in ("tensors", "numel", "changed")})

    def structural(self) -> pd.DataFrame:
        """Tensors not analysed, with the reason, and analysed ones that carry a note (dtype changes)."""
        df = self.to_frame()
        mask = ~df["analysed"].astype(bool) | (df["detail"] != "")
        return df.loc[mask, ["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape"]]

    def _summary(self) -> list[str]:
        o = self.overall()
        if o["tensors"] == 0:
            return ["No 2-D float matrix was analysed."]
        if o["changed"] == 0:
            n = count(int(o["tensors"]), "analysed matrix", "analysed matrices")
            return [f"No entry of the {n} changed: overlaps are undefined."]
        lines = [principal_sentence(o, self.alpha)]
        pnl = (o["overlap_principal_not_low"], o["ratio_principal_not_low"], o["ratio_principal_not_low_magnitude"])
        lines.append(
            f"Low-magnitude weights: overlap {o['overlap_low']:.3f} vs random {o['baseline_low']:.3f} "
            f"(ratio {o['ratio_low']:.2f}), vs magnitude-matched {o['baseline_low_magnitude']:.3f} "
            f"(ratio {o['ratio_low_magnitude']:.2f}); principal ∩ not-low: overlap {pnl[0]:.3f} "
            f"(ratio {pnl[1]:.2f}, magnitude-matched {pnl[2]:.2f})."
        )
        e, er = o["energy_principal"], o["energy_principal_random"]
        if not math.isnan(e):
            lines.append(
                f"Update energy in the top-k principal subspace E_k {e:.4g} vs {er:.4g} for an isotropic random "
                f"update ({ratio(e, er):.2f}x); one-sided U_k {o['energy_left']:.4g} vs {o['energy_left_random']:.4g}, "
                f"V_k {o['energy_right']:.4g} vs {o['energy_right_random']:.4g} (weighted by ‖ΔW‖_F²)."
            )
        lin = self.linear_only()
        lines.append(
            f"{count(int(o['tensors']), 'matrix', 'matrices')}, {int(o['changed']):,} updated entries "
            f"(density {o['update_density']:.4f}); "
            f"linear layers only: ratio {lin['ratio_principal']:.2f}, magnitude-matched "
            f"{lin['ratio_principal_magnitude']:.2f}."
        )
        return lines

    def report(self) -> Report:
        """The report the CLI renders."""
        overall = figures_table({"overall": self.overall(), "linear layers": self.linear_only()})
        note = (
            "Overlaps weighted by updated entries; ratios = observed / expected intersection; "
            "energies weighted by ‖ΔW‖_F²."
        )
        tables = [Table("Overall", overall, note)]
        for key, title in (("module", "Per module type"), ("layer", "Per layer")):
            g = self.by(key)
            tables.append(Table(title, g[_SHOWN] if not g.empty else g, view=_VIEW, legend=_LEGEND))
        df = self.to_frame()
        findings, notes = digest(df, None, expected_skips(df))  # the rule every command shares
        findings = findings[["tensor", "status", "detail", "dtype_base", "dtype_ft", "shape"]]
        return Report("ckptdiff principal-overlap", self.header, self._summary() + notes, tables, df, findings)


# ---------------------------------------------------------------------------------------------
# mask files


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """(m, n) bool -> (m, ceil(n/8)) uint8 like numpy.packbits(axis=-1, bitorder='big'), on the mask's device."""
    m, n = mask.shape
    x = torch.nn.functional.pad(mask.to(torch.int32), (0, (-n) % 8))  # (m, 8·nb)
    shifts = torch.arange(7, -1, -1, dtype=torch.int32, device=mask.device)  # first column -> bit 7
    return (x.reshape(m, -1, 8) << shifts).sum(-1).to(torch.uint8)  # (m, nb, 8) -> (m, nb)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``--save-masks`` file back as (m, n) bool masks keyed ``<tensor>.principal|low|update``."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASK_FORMAT:
            raise InputError(f"{path} is not a ckptdiff mask file (metadata format {meta.get('format')!r})")
        shapes = fileio.parse_json(meta["shapes"].encode(), f"mask file {path}", "write it again with --save-masks")
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            _, n = shapes[key.rsplit(".", 1)[0]]
            packed = f.get_tensor(key)  # (m, ceil(n/8)) uint8
            bits = (packed.unsqueeze(-1).to(torch.int32) >> torch.arange(7, -1, -1, dtype=torch.int32)) & 1
            out[key] = bits.reshape(packed.shape[0], -1)[:, :n].to(torch.bool)  # (m, n)
    return out


class _MaskFile:
    """A safetensors file written tensor by tensor: a header region is reserved first and filled in at the end.

    Data goes to the output's temporary file; ``finish`` writes the header (JSON padded with spaces, which the
    format allows) and completes the output (its set renames it into place); ``abort`` removes it. Memory holds one
    matrix's masks at a time.
    """

    def __init__(self, out: Output, candidates: Sequence[tuple[str, int, int]], metadata: dict[str, str]):
        self.out = out
        self.metadata = metadata
        self.entries: dict[str, dict[str, object]] = {}
        self.shapes: dict[str, list[int]] = {}
        nbytes = sum(3 * m * ((n + 7) // 8) for _, m, n in candidates)
        worst = {name: [m, n] for name, m, n in candidates}
        fake: dict[str, dict[str, object]] = {
            f"{name}.{part}": {"dtype": "U8", "shape": [m, (n + 7) // 8], "data_offsets": [nbytes, nbytes]}
            for name, m, n in candidates
            for part in ("principal", "low", "update")
        }
        self.reserved = len(self._header(fake, worst)) + 8 - len(self._header(fake, worst)) % 8
        self.file = out.open()
        with out.writing():
            self.file.seek(8 + self.reserved)
        self.offset = 0

    def _header(self, entries: dict[str, dict[str, object]], shapes: dict[str, list[int]]) -> bytes:
        meta = {**self.metadata, "shapes": json.dumps(shapes, separators=(",", ":"))}
        return json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()

    def add(self, name: str, masks: dict[str, torch.Tensor]) -> None:
        """Append the packed masks of one (m, n) matrix."""
        m, n = next(iter(masks.values())).shape
        self.shapes[name] = [m, n]
        for part, mask in masks.items():
            data = pack_rows(mask).cpu().numpy().tobytes()
            with self.out.writing():
                self.file.write(data)
            end = self.offset + len(data)
            shape = [m, (n + 7) // 8]
            self.entries[f"{name}.{part}"] = {"dtype": "U8", "shape": shape, "data_offsets": [self.offset, end]}
            self.offset = end

    def finish(self) -> None:
        """Write the header into the reserved region and complete the output."""
        head = self._header(self.entries, self.shapes)
        head += b" " * (self.reserved - len(head))
        with self.out.writing():
            self.file.seek(0)
            self.file.write(struct.pack("<Q", len(head)) + head)
        self.out.finish()

    def abort(self) -> None:
        """Close and delete the temporary file."""
        self.out.discard()


# ---------------------------------------------------------------------------------------------
# the analysis


def _reason(it: Aligned) -> str:
    """Why a tensor is not analysed ('' when it is)."""
    if not it.comparable:  # the structural note, worded as in every command (analyses.base.item_detail)
        return item_detail(it) or it.status.replace("_", " ")
    if not it.is_float:
        return "not analysed: not a float tensor"
    dims = len(it.base.shape)
    if dims != 2:
        return f"not analysed: {dims}-D, not a matrix"
    if it.base.numel == 0:
        return "not analysed: empty matrix"
    return ""


def _batch_rows(
    items: Sequence[Aligned],
    w0s: torch.Tensor,
    w1s: torch.Tensor,
    *,
    shared: SharedSVD,
    side: int,
    need: linalg.Need,
    alpha: float,
    mode: CompareMode,
) -> list[tuple[Aligned, PrincipalResult | None, PrincipalMasks | None, torch.Tensor | None]]:
    """Metrics of one same-shape batch: (item, result, region masks, update mask); result None if W0 is not finite.

    The top-k triplets of W0 come from the batch's shared decompositions (``side`` is the base's run index).
    """
    upd = update_mask(w0s, w1s, mode)  # (b, m, n) bool
    finite = shared.finite(side)  # (b,)
    keep = [i for i in range(len(items)) if finite[i]]
    out: list[tuple[Aligned, PrincipalResult | None, PrincipalMasks | None, torch.Tensor | None]] = [
        (it, None, None, None) for it in items
    ]
    if not keep:
        return out
    s, u, v, labels = shared.get(side, need, keep)
    for j, i in enumerate(keep):
        result, masks = principal_metrics_with_masks(w0s[i], upd[i], u[j], s[j], v[j], alpha, w1=w1s[i], svd=labels[j])
        out[i] = (items[i], result, masks, upd[i])
    return out


class PrincipalAnalysis(Analysis):
    """Principal-weight overlap per 2-D matrix of one base/fine-tune pair, in batched top-k SVDs of the base."""

    name = "principal"
    state_fields = ("results", "nonfinite", "zero_base")

    def __init__(
        self,
        *,
        k: int = choices.DEFAULT_K,
        alpha: float = 0.5,
        svd: str = "auto",
        precision: str = "fp32",
        mode: CompareMode = CompareMode(),
        save_masks: str | Path | Output | None = None,
        sides: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__(sides)
        self.cdtype = choices.precision_dtype(precision)
        self.k, self.alpha, self.svd = choices.k_value(k), choices.alpha_value(alpha), choices.svd_method(svd)
        self.precision, self.mode = precision, mode
        self.mask_out = standalone(save_masks, "save_masks")  # the caller checks a path against its inputs
        self.items: list[Aligned] = []
        self.results: dict[str, PrincipalResult] = {}
        self.nonfinite: set[str] = set()
        self.zero_base: set[str] = set()  # all-zero base matrices: no principal weights to speak of
        self.writer: _MaskFile | None = None
        self.device_type = "cpu"
        self.head: dict[str, str] = {}

    def form(self, item: Aligned) -> Form | None:
        return Form.MATRIX if item.is_matrix else None

    def matrix_bytes(self, item: Aligned) -> int:
        """The SVD workspace plus the W1 matrix and the update mask."""
        m, n = item.base.shape
        in0, in1 = (widened(info.dtype.torch) for info in item.infos if info is not None)  # fp8 is upcast
        dev = self.device_type
        chosen = linalg.choose_method(m, n, self.k, self.svd)  # type: ignore[arg-type]
        work = "randomized" if chosen == "randomized" else "svd"
        per = linalg.workspace_bytes((m, n), in0, self.cdtype, work=work, k=self.k, device_type=dev)  # type: ignore[arg-type]
        return per + m * n * (torch.empty((), dtype=in1).element_size() + 1)

    def cost(self, item: Aligned) -> float:
        """Seconds for the top-k SVD of W0 (see linalg.svd_seconds)."""
        m, n = item.base.shape
        return linalg.svd_seconds(m, n, self.k, linalg.choose_method(m, n, self.k, self.svd))

    def params(self, run: Run) -> dict[str, object]:
        """The header's parameters."""
        return {
            "k": self.k,
            "alpha": self.alpha,
            "svd": self.svd,
            "precision": self.precision,
            "batch_budget_gib": f"{run.budget / 1024**3:.3g}",
            "save_masks": self.mask_out or "",
        }

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)
        self.device_type = run.device.type
        self.head = run.header("principal-overlap", self.sides, self.mode, **self.params(run))
        if self.mask_out is not None:
            if distributed.world() is not None:
                raise InputError("--save-masks is not supported with several ranks (torchrun); run one process for it")
            meta = {"format": MASK_FORMAT, "packing": MASK_PACKING, **self.head}
            shapes = [(it.name, int(it.base.shape[0]), int(it.base.shape[1])) for it in items if it.is_matrix]
            self.writer = _MaskFile(self.mask_out, shapes, meta)

    def need(self) -> linalg.Need:
        """What the rank-k mask needs of W0's SVD: the top k vectors on both sides, by --svd, in --precision."""
        return linalg.Need(left=self.k, right=self.k, dtype=self.cdtype, method=self.svd)  # type: ignore[arg-type]

    def svd_requests(self, item: Aligned) -> Sequence[SvdRequest]:
        return [SvdRequest(self.sides[0], self.need())]

    def on_batch(self, items: Sequence[Aligned], stacks: tuple[torch.Tensor, ...]) -> None:
        w0s, w1s = (widen_fp8(s) for s in stacks)  # exact; torch has no isfinite or SVD for fp8
        assert self.svds is not None, "the pipeline hands every matrix analysis the batch's shared SVDs"
        rows = _batch_rows(
            items, w0s, w1s, shared=self.svds, side=self.sides[0], need=self.need(), alpha=self.alpha, mode=self.mode
        )
        finite_ft = linalg.finite_rows(w1s)  # (b,)
        zero = (w0s.flatten(1) == 0).all(1).tolist()  # (b,): every top-k "direction" of a zero matrix is arbitrary
        for (it, result, masks, upd), ok_ft, is_zero in zip(rows, finite_ft, zero, strict=True):
            if is_zero:
                self.zero_base.add(it.name)
                continue
            if result is None or not ok_ft:
                self.nonfinite.add(it.name)  # masks stay meaningful for a NaN fine-tune; energy does not
            if result is None:
                continue
            self.results[it.name] = result
            if self.writer is not None and masks is not None and upd is not None:
                self.writer.add(it.name, {"principal": masks.principal, "low": masks.low, "update": upd})

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def finish(self, run: Run) -> PrincipalOverlapResult:
        if self.writer is not None:
            self.writer.finish()
            self.writer = None
        rows = [
            _row(it, self.results.get(it.name), it.name in self.nonfinite, self.mode, it.name in self.zero_base)
            for it in self.items
        ]
        return PrincipalOverlapResult(self.head, self.alpha, rows)


def principal_overlap(
    base: SourceLike,
    ft: SourceLike,
    *,
    k: int = choices.DEFAULT_K,
    alpha: float = 0.5,
    svd: str = "auto",
    precision: str = "fp32",
    mode: CompareMode | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    as_dtype: torch.dtype | str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    batch_budget: float | None = None,
    save_masks: str | Path | Output | None = None,
    progress: bool = True,
    merged_dtype: torch.dtype | str | None = None,
) -> PrincipalOverlapResult:
    """Principal-weight overlap of ``ft``'s update relative to ``base``, per 2-D matrix (docs/metrics.md §2, §2b).

    ``k`` singular directions (capped at min(m, n)), masks of density ``alpha``, SVD by ``svd`` in ``precision``;
    same-shape matrices are batched so one batch fits ``batch_budget`` GiB (default: pipeline.default_budget).
    ``save_masks`` writes the principal, low-magnitude and update masks to a safetensors file (see module doc): a
    path, or an :class:`~ckptdiff.io.outputs.Output` of the caller's set, which then renames it with its other files.
    """
    mode = compare_mode(mode, rtol=rtol, atol=atol, as_dtype=as_dtype)
    mask_out = standalone(save_masks, "save_masks", [base, ft])  # checked now; the CLI hands in one of its set
    analysis = PrincipalAnalysis(k=k, alpha=alpha, svd=svd, precision=precision, mode=mode, save_masks=mask_out)
    opts: dict[str, Any] = {"include": include, "exclude": exclude, "device": device, "batch_budget": batch_budget}
    opts["merged_dtype"] = merged_dtype  # an adapter FT: what its merged weights are stored as
    return run_pair(base, ft, analysis, label="principal overlap", progress=progress, **opts)  # type: ignore[no-any-return]


def _row(
    it: Aligned, result: PrincipalResult | None, nonfinite: bool, mode: CompareMode, zero_base: bool = False
) -> dict[str, object]:
    row = row_basics(it)
    row["compared_as"] = ""
    if it.comparable and it.is_float:
        row["compared_as"] = dtype_name(pair_target(it, mode.as_dtype))
    reason = _reason(it)
    if zero_base:
        reason = "not analysed: the base matrix is all zeros, so its principal weights are undefined"
    if nonfinite:
        reason = reason or (
            non_finite_detail("the fine-tune", "update energy undefined")
            if result is not None
            else non_finite_detail("the base", "SVD undefined, not analysed")
        )
    row["analysed"] = result is not None
    row["detail"] = reason or item_detail(it)
    row.update(asdict(result) if result is not None else dict.fromkeys(_RESULT_FIELDS, math.nan))
    if result is None:
        row["numel"] = row_basics(it)["numel"]
        row["svd"] = ""
    row["outcome"] = _outcome(result is not None, nonfinite).value
    return row


def _outcome(measured: bool, nonfinite: bool) -> Outcome:
    if nonfinite:
        return Outcome.NON_FINITE
    return Outcome.ANALYSED if measured else Outcome.NOT_ANALYSED
