"""The fine-tunes of one ``report`` side by side: the comparison table, the verdict sentences and the glossary.

Everything here is read from the analyses' results (their ``overall()`` figures, the consistency pairs), never
recomputed, so each cell equals what the single command prints for that fine-tune. A row is one headline figure
beside its control; each cell carries a verdict word decided by the "no effect" bands of
:mod:`ckptdiff.metrics.numeric` (a ratio to its control within 1 ± band is "no effect").

Verdict words, by row:

- update sparsity: ``sparsest`` / ``densest`` among the fine-tunes when their changed fractions differ by more than
  the overlap band (relative), else nothing (one fine-tune: nothing; sparsity has no control of its own);
- principal overlap (ratio to the random and to the magnitude-matched baseline): ``avoids`` below 1 − band,
  ``targets`` above 1 + band, ``no effect`` within;
- energy in the top-k subspace against an isotropic random update: ``concentrated`` / ``no effect`` / ``avoids``;
- NSS and the largest principal angle against the equal-norm random null: ``below null`` / ``as null`` /
  ``above null`` (``no null`` when it was not computed, ``unstable`` when no matrix has a stable angle);
- Jaccard with another fine-tune against the magnitude-matched baseline (agreement band): ``shared`` / ``as
  chance`` / ``avoided``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from ckptdiff.analyses.base import Table
from ckptdiff.analyses.scopes import angles_ok
from ckptdiff.metrics.numeric import AGREEMENT_BAND, OVERLAP_BAND, against_one, ratio

if TYPE_CHECKING:
    from ckptdiff.analyses.consistency import ConsistencyResult
    from ckptdiff.analyses.principal import PrincipalOverlapResult
    from ckptdiff.analyses.sparsity import SparsityResult
    from ckptdiff.analyses.spectral import SpectralDriftResult


class FullReportResult(Protocol):
    """What this module reads of a ``report`` run (:class:`ckptdiff.analyses.full.FullReportResult`, which imports
    this module: named here by its shape, not imported)."""

    @property
    def header(self) -> dict[str, str]: ...
    @property
    def runs(self) -> tuple[str, ...]: ...
    @property
    def sparsity(self) -> dict[str, SparsityResult]: ...
    @property
    def principal(self) -> dict[str, PrincipalOverlapResult]: ...
    @property
    def spectral(self) -> dict[str, SpectralDriftResult]: ...
    @property
    def consistency(self) -> ConsistencyResult | None: ...


NO_EFFECT = "no effect"

# Terms the report's pages use, defined in the page itself (the HTML's glossary and tooltips, the Markdown's).
GLOSSARY: dict[str, str] = {
    "update sparsity": "The fraction of entries whose stored value is exactly the base's (bit for bit in the "
    "compared dtype). 1 means nothing changed.",
    "bf16-visible sparsity": "The update sparsity after rounding both sides to bf16: what a bf16 copy of an fp32 "
    "checkpoint would show. For checkpoints stored in bf16 it is the update sparsity itself.",
    "principal weights": "The entries with the largest magnitude in the base's rank-k reconstruction (the top α "
    "share): the weights the top-k singular directions rely on most.",
    "random baseline": "The overlap an update blind to the weights would reach: the mask's own share of entries "
    "(α for the principal mask).",
    "magnitude-matched baseline": "The overlap (or Jaccard) an update would reach if it picked its entries at "
    "random among base weights of the same magnitude, at its own density. Small or bf16-rounded updates change "
    "large and small weights at different rates; this baseline takes that out, so only a departure from it is "
    "more than update size and rounding.",
    "overlap ratio": "Observed overlap over its baseline: below 1 the update avoids the mask, above 1 it targets it.",
    "energy in the top-k subspace": "The share of the update's squared Frobenius norm that lies in the base's top-k "
    "left and right singular subspaces (E_k), against what an isotropic random update of the same shape would put "
    "there (k²/(m·n)).",
    "NSS": "Normalised spectral shift: how far the singular values moved, ‖σ(W1) − σ(W0)‖ / ‖σ(W0)‖.",
    "principal angle": "The largest angle between the base's and the fine-tune's top-k singular subspaces "
    "(left or right). It is a measurement only where the singular-value gap at k is wide against the update "
    "(Wedin bound below 45°) and k < min(m, n); other matrices are left out.",
    "equal-norm random null": "The same figure for a random update of the same Frobenius norm as the real one, "
    "drawn once per matrix from the report's seed: a figure no smaller than its null is no more structured than "
    "the update's size implies.",
    "Jaccard": "|A∩B| / |A∪B| of two fine-tunes' update masks: 1 when they changed exactly the same entries.",
    "density": "The share of entries that changed (1 − update sparsity).",
    "consensus": "How many of the fine-tunes changed an entry, against what independent fine-tunes changing their own "
    "number of entries at random would give.",
    "ULP": "Unit in the last place: one step between neighbouring values of the stored dtype, the smallest change a "
    "stored value can make.",
    "Wedin bound": "arcsin(‖ΔW‖₂ / gap), the largest rotation of the top-k subspace the update could cause given the "
    "singular-value gap at k; at 45° or more the angle is not a measurement (directions can trade places).",
    "PNT": "“The Path Not Taken” (arXiv 2511.08567), the paper whose predictions about RL and SFT updates these "
    "analyses test; its precision gate is the observation that bf16 rounding hides small updates.",
    "no effect": f"A ratio to its control within 1 ± {OVERLAP_BAND:.0%} (Jaccard: ± {AGREEMENT_BAND:.0%}) is read "
    "as no effect; the numbers are always printed beside the words.",
}


@dataclass(frozen=True)
class Row:
    """One headline figure of one fine-tune: its value, its control (NaN when none) and the verdict word."""

    value: float
    control: float = math.nan
    word: str = ""
    # Against a random null drawn several times (--null-draws): (draws whose own figure gives the same word, draws);
    # the control is then the median of the draws' figures.
    support: tuple[int, int] | None = None


@dataclass(frozen=True)
class Comparison:
    """The comparison table: per headline figure (rows, in order) and fine-tune (columns), a :class:`Row`."""

    runs: tuple[str, ...]
    rows: dict[str, dict[str, Row]]  # figure label -> run -> row
    terms: dict[str, str]  # figure label -> glossary term that explains it
    note: str

    def values(self) -> pd.DataFrame:
        """The figures, rows by label, a column per fine-tune (NaN where a figure does not apply)."""
        return self._frame(lambda r: r.value)

    def controls(self) -> pd.DataFrame:
        """The control each figure stands beside (NaN where there is none)."""
        return self._frame(lambda r: r.control)

    def words(self) -> pd.DataFrame:
        """The verdict word of each cell ('' where none)."""
        return self._frame(lambda r: r.word).fillna("")

    def _frame(self, get: Callable[[Row], Any]) -> pd.DataFrame:
        data = {
            run: [get(cells[run]) if run in cells else math.nan for cells in self.rows.values()] for run in self.runs
        }
        frame = pd.DataFrame(data, index=pd.Index(list(self.rows), name="figure"))
        return frame

    def table(self, sep: str = " ") -> Table:
        """The table as text cells (value, control in brackets, verdict word) for the terminal, Markdown and JSON;
        ``sep`` goes between the figure and its word (the terminal gives a line break)."""
        cells = {
            run: [cell_text(label, cells.get(run), sep) for label, cells in self.rows.items()] for run in self.runs
        }
        frame = pd.DataFrame(cells, index=pd.Index(list(self.rows), name="figure"))
        return Table("Side by side", frame, self.note, rollup=False)  # text cells: the figures are in the rollups


def cell_text(label: str, row: Row | None, sep: str = " ") -> str:
    """One cell as text: the value (and its control in brackets) followed by the verdict word."""
    if row is None:
        return "—"
    value = _number(label, row.value)
    if not math.isnan(row.control):
        value += f" ({_number(label, row.control)})"
    word = row.word
    if word and row.support is not None and row.support[1] > 1:
        word += f" in {row.support[0]}/{row.support[1]} draws"
    return f"{value}{sep}{word}" if word else value


def _number(label: str, v: float) -> str:
    if math.isnan(v):
        return "—"
    if "angle" in label:
        return f"{v:.1f}°"
    if label.startswith("NSS"):
        return f"{v:.3g}"
    if "sparsity" in label:
        return f"{v:.1%}"
    return f"{v:.3f}" if "Jaccard" in label else f"{v:.2f}"


def _side(value: float, band: float, words: tuple[str, str, str]) -> str:
    """``words`` (below, within, above) by where ``value`` lies against 1 ± band; '' when undefined."""
    side = against_one(value, band)
    return {"below": words[0], "within": words[1], "above": words[2]}.get(side, "")


OVERLAP_WORDS = ("avoids", NO_EFFECT, "targets")
ENERGY_WORDS = ("avoids", NO_EFFECT, "concentrated")
NULL_WORDS = ("below null", "as null", "above null")
AGREEMENT_WORDS = ("avoided", "as chance", "shared")

SPARSITY = "update sparsity"
SPARSITY_BF16 = "bf16-visible sparsity"
PRINCIPAL_RANDOM = "principal overlap ÷ random"
PRINCIPAL_MAGNITUDE = "principal overlap ÷ magnitude-matched"
ENERGY = "top-k energy ÷ isotropic"
NSS = "NSS median (null)"
ANGLE = "max principal angle (null)"


def comparison(report: FullReportResult) -> Comparison:
    """The headline figures of every fine-tune side by side (see the module doc for the verdict words)."""
    runs = tuple(report.runs)
    rows: dict[str, dict[str, Row]] = {}
    terms: dict[str, str] = {}
    if report.sparsity:
        _sparsity_rows(report, rows, terms)
    if report.principal:
        for run, res in report.principal.items():
            o = res.overall()
            if not o.get("tensors") or not o.get("changed"):
                continue
            r, rm = o["ratio_principal"], o["ratio_principal_magnitude"]
            rows.setdefault(PRINCIPAL_RANDOM, {})[run] = Row(r, word=_side(r, OVERLAP_BAND, OVERLAP_WORDS))
            rows.setdefault(PRINCIPAL_MAGNITUDE, {})[run] = Row(rm, word=_side(rm, OVERLAP_BAND, OVERLAP_WORDS))
            e = ratio(o["energy_principal"], o["energy_principal_random"])
            if not math.isnan(e):
                rows.setdefault(ENERGY, {})[run] = Row(e, word=_side(e, OVERLAP_BAND, ENERGY_WORDS))
        terms |= {PRINCIPAL_RANDOM: "random baseline", PRINCIPAL_MAGNITUDE: "magnitude-matched baseline"}
        terms[ENERGY] = "energy in the top-k subspace"
    if report.spectral:
        for run, drift in report.spectral.items():
            nss, angle = spectral_cells(drift)
            if nss is not None:
                rows.setdefault(NSS, {})[run] = nss
            if angle is not None:
                rows.setdefault(ANGLE, {})[run] = angle
        terms |= {NSS: "NSS", ANGLE: "principal angle"}
    cons = report.consistency
    if cons is not None:
        pairs = cons.pairs()
        for other in runs if len(runs) > 1 else ():
            label = f"Jaccard with {other} (magnitude-matched)"
            terms[label] = "Jaccard"
            for p in pairs.itertuples(index=False):
                a, b = str(p.run_a), str(p.run_b)
                if other not in (a, b) or a == b:
                    continue
                run = b if a == other else a
                j, jm = float(p.jaccard), float(p.jaccard_magnitude)  # type: ignore[arg-type]
                word = _side(ratio(j, jm), AGREEMENT_BAND, AGREEMENT_WORDS)
                rows.setdefault(label, {})[run] = Row(j, jm, word)
    note = (
        "Each cell: the figure, its control in brackets where it has one, and the verdict word. Ratios within "
        f"1 ± {OVERLAP_BAND:.0%} of their control (Jaccard: ± {AGREEMENT_BAND:.0%}) read as no effect"
    )
    note += (
        "; sparsest / densest are said only when the fine-tunes differ by more than that." if SPARSITY in rows else "."
    )
    return Comparison(runs, rows, terms, note)


@dataclass(frozen=True)
class _Across:
    """A consistency result alone, shaped as a report run with no pairwise analysis."""

    consistency: ConsistencyResult
    header: dict[str, str]
    runs: tuple[str, ...]
    sparsity: dict[str, SparsityResult] = field(default_factory=dict)
    principal: dict[str, PrincipalOverlapResult] = field(default_factory=dict)
    spectral: dict[str, SpectralDriftResult] = field(default_factory=dict)


def across_runs(result: ConsistencyResult) -> Comparison:
    """The comparison table of ``consistency`` alone: each fine-tune's Jaccard with every other, beside its
    magnitude-matched control, with the verdict words."""
    return comparison(_Across(result, result.header, tuple(result.labels)))


def _sparsity_rows(report: FullReportResult, rows: dict[str, dict[str, Row]], terms: dict[str, str]) -> None:
    dense: dict[str, float] = {}
    for run, res in report.sparsity.items():
        o = res.overall()
        if not o.get("numel"):
            continue
        dense[run] = 1.0 - o["sparsity"]
        rows.setdefault(SPARSITY, {})[run] = Row(o["sparsity"])
        if "sparsity_bf16" in o:
            rows.setdefault(SPARSITY_BF16, {})[run] = Row(o["sparsity_bf16"])
        elif stored_bf16(res):
            rows.setdefault(SPARSITY_BF16, {})[run] = Row(o["sparsity"], word="as stored")
    terms |= {SPARSITY: "update sparsity", SPARSITY_BF16: "bf16-visible sparsity"}
    if len(dense) > 1:
        lo, hi = min(dense.values()), max(dense.values())
        if hi > 0 and (lo == 0 or against_one(ratio(hi, lo), OVERLAP_BAND) == "above"):
            for run, d in dense.items():
                word = "sparsest" if d == lo else "densest" if d == hi else ""
                rows[SPARSITY][run] = Row(rows[SPARSITY][run].value, word=word)


def stored_bf16(result: Any) -> bool:
    """Every compared float tensor of a sparsity result was compared as bf16 (its bf16 view is itself)."""
    df = result.compared()
    return bool(len(df)) and set(df["compared_as"].astype(str)) == {"bf16"}


def spectral_cells(result: Any) -> tuple[Row | None, Row | None]:
    """NSS (median over the analysed matrices) and the largest stable principal angle, each beside the same
    figure of the equal-norm random null over the same matrices when it was computed."""
    df = result.analysed()
    if df.empty:
        return None, None
    o = result.overall()
    if not (df["delta_rel_fro"].astype("float64") > 0).any():  # nothing moved: no drift, no rotation to judge
        return Row(o["nss_median"], word="unchanged"), Row(math.nan, word="unchanged")
    with_null = bool(result.with_null)
    if not with_null:
        nss = Row(o["nss_median"], word="no null")
    else:
        draws = result.null_draws()
        nss = _against_draws(o["nss_median"], draws.groupby("draw")["nss_null"].median().tolist())
    stable = df[angles_ok(df)]
    if stable.empty:
        k = result.header.get("k", "?")
        return nss, Row(math.nan, word=f"no stable angle at k = {k}")
    worst = max(o["angle_u_deg_max"], o["angle_v_deg_max"])
    if not with_null:
        return nss, Row(worst, word="no null")
    mine = draws[draws["tensor"].isin(set(stable["tensor"]))]  # the same matrices as the observed maximum
    per_draw = mine[["angle_u_max_deg_null", "angle_v_max_deg_null"]].max(axis=1).groupby(mine["draw"]).max()
    return nss, _against_draws(worst, per_draw.tolist())


def _against_draws(value: float, nulls: Sequence[float]) -> Row:
    """``value`` beside the null drawn ``len(nulls)`` times: the control is the draws' median, the word is read
    against it, and the support counts the draws whose own figure gives the same word."""
    control = float(np.median(nulls)) if len(nulls) else math.nan
    word = _side(ratio(value, control), OVERLAP_BAND, NULL_WORDS)
    agree = sum(_side(ratio(value, n), OVERLAP_BAND, NULL_WORDS) == word for n in nulls)
    return Row(value, control, word, (agree, len(nulls)))


# ---------------------------------------------------------------------------------------------
# the verdict: 2-4 plain sentences


def _names(runs: Sequence[str]) -> str:
    runs = list(runs)
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " and " + runs[-1]


def _pct(v: float) -> str:
    return f"{v:.1%}"


def verdict(report: FullReportResult, table: Comparison | None = None) -> list[str]:
    """What the fine-tunes did, in 2-4 sentences, each claim beside its control, read from ``table`` (default: the
    report's :func:`comparison`)."""
    c = table if table is not None else comparison(report)
    out = [s for s in (_sparsity_sentence(c), _principal_sentence(c), _spectral_sentence(c, report)) if s]
    agreement = _agreement_sentence(c, report)
    if agreement:
        out.append(agreement)
    return out[:4] or ["No analysis produced a headline figure (nothing was compared)."]


def _sparsity_sentence(c: Comparison) -> str:
    rows = c.rows.get(SPARSITY)
    if not rows:
        return ""
    bf16 = c.rows.get(SPARSITY_BF16, {})
    stored = all(bf16.get(r, Row(math.nan)).word == "as stored" for r in rows)
    how = "bit-identical in bf16" if stored and bf16 else "unchanged"
    parts = [f"{run} {_pct(row.value)}" for run, row in rows.items()]
    first, rest = parts[0].split(" ", 1)[0], parts[1:]
    text = f"{first} left {_pct(rows[first].value)} of entries {how}"
    text += "; " + ", ".join(rest) if rest else ""
    extra = [f"{run} {_pct(r.value)}" for run, r in bf16.items() if r.word != "as stored"]
    if extra:
        text += f" (as bf16 would store them: {', '.join(extra)})"
    return text + "."


def _principal_sentence(c: Comparison) -> str:
    naive, matched = c.rows.get(PRINCIPAL_RANDOM, {}), c.rows.get(PRINCIPAL_MAGNITUDE, {})
    if not naive:
        return ""
    groups: dict[tuple[str, str], list[str]] = {}  # (naive word, magnitude-matched word) -> runs
    for run, row in naive.items():
        groups.setdefault((row.word, matched.get(run, Row(math.nan)).word), []).append(run)
    clauses = []
    for (word, control), runs in groups.items():
        one = len(runs) == 1
        r = ", ".join(f"{naive[x].value:.2f}×" for x in runs)
        m = ", ".join(f"{matched[x].value:.2f}×" if x in matched else "—" for x in runs)
        act = word if one else word.removesuffix("s")
        if word in ("avoids", "targets") and control == NO_EFFECT:
            text = f"{act} the principal weights against random ({r}) but no more than weights of the same "
            text += f"magnitude ({m}): the update size explains it"
        elif word in ("avoids", "targets") and control == word:
            text = f"{act} the principal weights against random ({r}) and against weights of the same magnitude "
            text += f"({m})"
        elif control in ("avoids", "targets"):
            act = control if one else control.removesuffix("s")
            text = f"{act} the principal weights against weights of the same magnitude ({m}; against random {r})"
        elif word == NO_EFFECT:
            text = f"{'neither avoids nor targets' if one else 'neither avoid nor target'} the principal weights "
            text += f"({r} random, {m} magnitude-matched)"
        else:
            text = f"{'has' if one else 'have'} no defined principal overlap"
        clauses.append(f"{_names(runs)} {text}")
    return "; ".join(clauses) + "."


def _spectral_sentence(c: Comparison, report: FullReportResult) -> str:
    nss, angle = c.rows.get(NSS, {}), c.rows.get(ANGLE, {})
    if not nss:
        return ""
    with_null = any(r.word not in ("no null", "unchanged") for r in nss.values())
    stable = {run: r for run, r in angle.items() if not math.isnan(r.value)}
    nss = {run: r for run, r in nss.items() if r.word != "unchanged"}
    if not nss:
        return ""
    if with_null and stable:
        rot = [run for run, r in stable.items() if r.word == "above null"]
        still = [run for run, r in stable.items() if r.word != "above null"]
        parts = []
        if rot:
            nums = ", ".join(
                f"{stable[r].value:.1f}° vs null {stable[r].control:.1f}°{_support(stable[r])}" for r in rot
            )
            parts.append(
                f"{_names(rot)} {'rotate' if len(rot) > 1 else 'rotates'} the top-k subspaces more than "
                f"an equal-norm random update ({nums})"
            )
        if still:
            nums = ", ".join(
                f"{stable[r].value:.1f}° vs null {stable[r].control:.1f}°{_support(stable[r])}" for r in still
            )
            if rot:
                parts.append(f"{_names(still)} {'do' if len(still) > 1 else 'does'} not ({nums})")
            else:
                verb = "rotate" if len(still) > 1 else "rotates"
                parts.append(
                    f"{_names(still)} {verb} the top-k subspaces no more than an equal-norm random update ({nums})"
                )
        text = "; ".join(parts)
        return text + _draws_said(report, stable)
    nums = ", ".join(f"{run} {r.value:.3g}" for run, r in nss.items())
    text = f"Median spectral shift (NSS): {nums}"
    if with_null:
        words = ", ".join(f"{run}: {r.word}{_support(r)}" for run, r in nss.items())
        text += f" ({words}; {_draws_words(report)})"
    else:
        if stable:
            text += "; largest stable principal angle " + ", ".join(f"{r} {a.value:.1f}°" for r, a in stable.items())
        text += "; no random null was computed, so whether that is more than the update sizes imply is untested"
    if not stable and any(r.word.startswith("no stable") for r in angle.values()):
        k = next(iter(report.spectral.values())).header.get("k", "?")
        text += f"; no matrix has stable principal angles at k = {k} (try a smaller --k)"
    return text + "."


def _seed(report: FullReportResult) -> int:
    raw = report.header.get("seed", next(iter(report.spectral.values())).header.get("seed", 0))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def _support(row: Row) -> str:
    """`` in 4 of 5 draws`` after a figure judged against a null drawn several times; nothing for one draw."""
    if row.support is None or row.support[1] <= 1:
        return ""
    return f" in {row.support[0]} of {row.support[1]} draws"


def _draws_words(report: FullReportResult) -> str:
    """How the null was drawn: one draw per matrix and its seed, or N draws and their seeds."""
    seed = _seed(report)
    raw = report.header.get("null_draws") or next(iter(report.spectral.values())).header.get("null_draws", "1")
    n = int(str(raw).split()[0])  # "3 (seeds 0 to 2)"
    if n <= 1:
        return f"one random draw per matrix, seed {seed}"
    return f"{n} random draws per matrix, seeds {seed} to {seed + n - 1}, the null being their median"


def _draws_said(report: FullReportResult, rows: dict[str, Row]) -> str:
    """The sentence's end: with one draw, that another seed can move the verdict; with several, how many agree."""
    n = max((r.support[1] for r in rows.values() if r.support), default=1)
    if n <= 1:
        return (
            f", against {_draws_words(report)}: a different --seed can move it (--null-draws N counts how many "
            "draws agree)."
        )
    return f", against {_draws_words(report)}."


def _agreement_sentence(c: Comparison, report: FullReportResult) -> str:
    cons = report.consistency
    if cons is None:
        return ""
    pairs = cons.pairs()
    if pairs.empty:
        return ""
    by_word: dict[str, list[tuple[tuple[str, str], str]]] = {}
    for p in pairs.itertuples(index=False):
        j, jm = float(p.jaccard), float(p.jaccard_magnitude)  # type: ignore[arg-type]
        word = _side(ratio(j, jm), AGREEMENT_BAND, AGREEMENT_WORDS)
        by_word.setdefault(word, []).append(((str(p.run_a), str(p.run_b)), f"{j:.3f} vs {jm:.3f}"))
    say = {
        "shared": "change the same entries more than their update sizes explain",
        "as chance": "share no more entries than their update sizes explain",
        "avoided": "avoid each other's entries more than their update sizes predict",
        "": "have no defined agreement",
    }
    clauses = []
    for word, items in by_word.items():
        pairs_named = ", ".join("/".join(i[0]) for i in items)
        who = " and ".join(items[0][0]) if len(items) == 1 else f"the pairs {pairs_named}"
        nums = ", ".join(i[1] for i in items)
        clauses.append(f"{who} {say[word]} (Jaccard {nums} magnitude-matched)")
    return "; ".join(clauses) + "."
