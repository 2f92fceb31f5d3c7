"""Consistency across runs (docs/metrics.md §4) with the magnitude-matched Jaccard baseline of §2b.

Given one base tensor W0 and R >= 2 fine-tunes of it, each pair of update masks (A, B) gets raw counts
(|A|, |B|, |A∩B|, expected intersections, sign agreement) from which every ratio is derived. Ratios are
never stored, so a group of tensors (a layer, a module type, the whole model) rolls up exactly by summing
counts (``PairCounts.__add__``, ``combine``):

- Jaccard of a group            J   = Σ_t |A∩B|_t / Σ_t |A∪B|_t
- random expected intersection  E   = Σ_t p_t q_t n_t            (p_t = |A|_t / n_t, q_t = |B|_t / n_t)
- random Jaccard baseline       J_r = E / (Σ_t |A|_t + Σ_t |B|_t − E)
- magnitude-matched expectation E*  = Σ_t Σ_b a_{t,b} b_{t,b} / n_{t,b}   (bins = bf16 exponent of W0)
- magnitude-matched baseline    J*  = E* / (Σ_t |A|_t + Σ_t |B|_t − E*)
- one-sided overlaps |A∩B| / |A| and |A∩B| / |B|, baselines E / Σ|A| and E / Σ|B| (q and p for one tensor)

For one tensor J_r reduces to pq / (p + q − pq). Both baselines are ratios of expectations.

Empty masks never divide by zero: a ratio whose denominator is 0 is NaN (Jaccard when |A∪B| = 0, an
overlap when its mask is empty, same_sign when no commonly changed entry has a sign); densities are 0.

same_sign is the fraction of entries in A∩B whose deltas ΔW_a = W1a − W0 and ΔW_b = W1b − W0 have the
same sign, counted over entries where W0, W1a and W1b are all finite and both deltas are nonzero. Signs
come from comparing the stored values (no subtraction, so no rounding); with ``CompareMode.as_dtype`` the
masks are decided on rounded values, and since rounding is monotone a changed entry's sign agrees.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch

from ckptdiff.errors import InputError
from ckptdiff.metrics.mask import CompareMode, bin_counts, exponent_bins, update_mask
from ckptdiff.metrics.numeric import ratio


@dataclass(frozen=True)
class PairCounts:
    """Raw counts for one pair of runs (a, b) over one tensor, or over a group once summed."""

    run_a: int
    run_b: int
    numel: int
    n_a: int  # |A|
    n_b: int  # |B|
    n_both: int  # |A ∩ B|
    expected_random: float  # Σ_t p_t q_t n_t
    expected_magnitude: float  # Σ_t Σ_b a_b b_b / n_b; NaN when no magnitude bins were given
    n_signed: int  # entries of A ∩ B with finite values and both deltas nonzero
    n_same_sign: int  # of those, entries whose deltas share a sign

    @property
    def n_union(self) -> int:
        """|A ∪ B|."""
        return self.n_a + self.n_b - self.n_both

    @property
    def density_a(self) -> float:
        """p = |A| / n (0 for an empty tensor)."""
        return self.n_a / self.numel if self.numel else 0.0

    @property
    def density_b(self) -> float:
        """q = |B| / n (0 for an empty tensor)."""
        return self.n_b / self.numel if self.numel else 0.0

    @property
    def jaccard(self) -> float:
        """|A ∩ B| / |A ∪ B|; NaN when both masks are empty."""
        return ratio(self.n_both, self.n_union)

    @property
    def jaccard_random(self) -> float:
        """Random baseline E / (|A| + |B| − E); pq / (p + q − pq) for one tensor."""
        return ratio(self.expected_random, self.n_a + self.n_b - self.expected_random)

    @property
    def jaccard_magnitude(self) -> float:
        """Magnitude-matched baseline E* / (|A| + |B| − E*)."""
        return ratio(self.expected_magnitude, self.n_a + self.n_b - self.expected_magnitude)

    @property
    def overlap_a(self) -> float:
        """|A ∩ B| / |A|: how much of run a's update run b repeats."""
        return ratio(self.n_both, self.n_a)

    @property
    def overlap_b(self) -> float:
        """|A ∩ B| / |B|: how much of run b's update run a repeats."""
        return ratio(self.n_both, self.n_b)

    @property
    def overlap_a_random(self) -> float:
        """Random baseline of overlap_a: E / |A| (q for one tensor)."""
        return ratio(self.expected_random, self.n_a)

    @property
    def overlap_b_random(self) -> float:
        """Random baseline of overlap_b: E / |B| (p for one tensor)."""
        return ratio(self.expected_random, self.n_b)

    @property
    def same_sign(self) -> float:
        """Fraction of commonly changed entries whose deltas share a sign; NaN when none has a sign."""
        return ratio(self.n_same_sign, self.n_signed)

    def __add__(self, other: PairCounts) -> PairCounts:
        """Sum the counts of two tensors (or groups) for the same pair of runs."""
        if (self.run_a, self.run_b) != (other.run_a, other.run_b):
            raise ValueError(f"cannot add pair ({self.run_a}, {self.run_b}) to pair ({other.run_a}, {other.run_b})")
        return PairCounts(
            run_a=self.run_a,
            run_b=self.run_b,
            numel=self.numel + other.numel,
            n_a=self.n_a + other.n_a,
            n_b=self.n_b + other.n_b,
            n_both=self.n_both + other.n_both,
            expected_random=self.expected_random + other.expected_random,
            expected_magnitude=self.expected_magnitude + other.expected_magnitude,
            n_signed=self.n_signed + other.n_signed,
            n_same_sign=self.n_same_sign + other.n_same_sign,
        )

    def as_dict(self) -> dict[str, float | int]:
        """Counts and derived ratios as one flat row (for a DataFrame or JSON)."""
        row: dict[str, float | int] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in (
            "n_union",
            "density_a",
            "density_b",
            "jaccard",
            "jaccard_random",
            "jaccard_magnitude",
            "overlap_a",
            "overlap_b",
            "overlap_a_random",
            "overlap_b_random",
            "same_sign",
        ):
            row[name] = getattr(self, name)
        return row


def _nanmean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


@dataclass(frozen=True)
class Consistency:
    """Consistency of R runs over one tensor (or a group once combined): pair counts and consensus histogram."""

    numel: int
    changed: tuple[int, ...]  # |M_r| per run
    consensus: tuple[int, ...]  # consensus[k] = entries changed by exactly k runs, k = 0..R
    pairs: tuple[PairCounts, ...]  # every a < b, in order (0,1), (0,2), ..., (R-2,R-1)

    @property
    def n_runs(self) -> int:
        """R."""
        return len(self.changed)

    @property
    def densities(self) -> tuple[float, ...]:
        """|M_r| / n per run (0 for an empty tensor)."""
        return tuple(c / self.numel if self.numel else 0.0 for c in self.changed)

    @property
    def consensus_fraction(self) -> tuple[float, ...]:
        """The consensus histogram as fractions of n (NaN for an empty tensor)."""
        return tuple(ratio(c, self.numel) for c in self.consensus)

    @property
    def mean_jaccard(self) -> float:
        """Mean off-diagonal Jaccard over pairs whose union is nonempty; NaN when none is."""
        return _nanmean(p.jaccard for p in self.pairs)

    @property
    def mean_jaccard_random(self) -> float:
        """Mean random Jaccard baseline over the same pairs as mean_jaccard."""
        return _nanmean(p.jaccard_random for p in self.pairs if p.n_union)

    @property
    def mean_jaccard_magnitude(self) -> float:
        """Mean magnitude-matched Jaccard baseline over the same pairs as mean_jaccard."""
        return _nanmean(p.jaccard_magnitude for p in self.pairs if p.n_union)

    def pair(self, a: int, b: int) -> PairCounts:
        """The counts for runs a and b (either order)."""
        lo, hi = min(a, b), max(a, b)
        for p in self.pairs:
            if (p.run_a, p.run_b) == (lo, hi):
                return p
        raise KeyError(f"no pair ({a}, {b}) among {self.n_runs} runs")

    def __add__(self, other: Consistency) -> Consistency:
        """Sum the counts of two tensors (or groups) over the same runs."""
        if self.n_runs != other.n_runs:
            raise ValueError(f"cannot add consistency over {self.n_runs} runs to one over {other.n_runs}")
        return Consistency(
            numel=self.numel + other.numel,
            changed=tuple(x + y for x, y in zip(self.changed, other.changed, strict=True)),
            consensus=tuple(x + y for x, y in zip(self.consensus, other.consensus, strict=True)),
            pairs=tuple(x + y for x, y in zip(self.pairs, other.pairs, strict=True)),
        )


def combine(items: Iterable[Consistency]) -> Consistency:
    """Exact rollup of several tensors' consistency by summing their counts (see the module docstring)."""
    total: Consistency | None = None
    for item in items:
        total = item if total is None else total + item
    if total is None:
        raise ValueError("combine needs at least one Consistency")
    return total


def delta_sign(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """sign(W1 − W0) as int8 (+1, −1), 0 where equal or where either value is not finite."""
    finite = torch.isfinite(w0) & torch.isfinite(w1)
    sign = torch.gt(w1, w0).to(torch.int8) - torch.lt(w1, w0).to(torch.int8)  # mixed dtypes promote exactly
    return torch.where(finite, sign, torch.zeros_like(sign))


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def _pair(
    a: int,
    b: int,
    masks: Sequence[torch.Tensor],
    sizes: Sequence[int],
    numel: int,
    per_bin: Sequence[torch.Tensor] | None,
    n_bin: torch.Tensor | None,
    signs: Sequence[torch.Tensor] | None,
) -> PairCounts:
    """Counts for one pair, given flattened masks, their sizes and optional per-bin counts and signs."""
    both = masks[a] & masks[b]
    n_both = _count(both)
    expected_random = sizes[a] * sizes[b] / numel if numel else 0.0  # p q n
    if per_bin is None or n_bin is None:
        expected_magnitude = math.nan
    else:  # Σ_b a_b b_b / n_b, as in mask.magnitude_matched_intersection
        expected_magnitude = float((per_bin[a] * per_bin[b] / n_bin.clamp_min(1)).sum())
    n_signed = n_same = 0
    if signs is not None:
        product = signs[a] * signs[b]  # +1 same sign, -1 opposite, 0 if either has no sign
        n_signed = _count(both & (product != 0))
        n_same = _count(both & (product > 0))
    return PairCounts(
        run_a=a,
        run_b=b,
        numel=numel,
        n_a=sizes[a],
        n_b=sizes[b],
        n_both=n_both,
        expected_random=expected_random,
        expected_magnitude=expected_magnitude,
        n_signed=n_signed,
        n_same_sign=n_same,
    )


def consistency_from_masks(
    masks: Sequence[torch.Tensor],
    bins: torch.Tensor | None = None,
    signs: Sequence[torch.Tensor] | None = None,
) -> Consistency:
    """Consistency of R update masks, with W0's exponent bins (magnitude baseline) and delta_sign per run.

    Without ``bins`` the magnitude-matched expectation is NaN; without ``signs`` same_sign is NaN.
    """
    if len(masks) < 2:
        raise InputError(f"consistency needs at least 2 fine-tuned runs, got {len(masks)}: pass two or more")
    numel = masks[0].numel()
    for name, group in (("mask", masks), ("sign", signs or ())):
        for i, t in enumerate(group):
            if t.numel() != numel:
                raise ValueError(f"{name} {i} has {t.numel()} entries, mask 0 has {numel}")
    if signs is not None and len(signs) != len(masks):
        raise ValueError(f"got {len(signs)} sign tensors for {len(masks)} masks")
    if bins is not None and bins.numel() != numel:
        raise ValueError(f"bins have {bins.numel()} entries, masks have {numel}")

    flat = [m.reshape(-1).to(torch.bool) for m in masks]  # (n,) each
    flat_signs = [s.reshape(-1).to(torch.int8) for s in signs] if signs is not None else None
    sizes = [_count(m) for m in flat]
    n_bin: torch.Tensor | None = None
    per_bin: list[torch.Tensor] | None = None
    if bins is not None:
        n_bin, per_bin = bin_counts(bins, *flat)  # (nbins,), R x (nbins,)

    runs = len(flat)
    votes = torch.zeros_like(flat[0], dtype=torch.uint8 if runs < 256 else torch.int32)  # (n,) runs per entry
    for m in flat:
        votes += m
    consensus = torch.bincount(votes, minlength=runs + 1)  # (R+1,)

    pairs = tuple(
        _pair(a, b, flat, sizes, numel, per_bin, n_bin, flat_signs) for a in range(runs) for b in range(a + 1, runs)
    )
    return Consistency(
        numel=numel,
        changed=tuple(sizes),
        consensus=tuple(int(c) for c in consensus.tolist()),
        pairs=pairs,
    )


def consistency(w0: torch.Tensor, fts: Sequence[torch.Tensor], mode: CompareMode = CompareMode()) -> Consistency:
    """Consistency of R fine-tuned tensors against one base tensor W0 (masks, bins and signs computed here)."""
    masks = [update_mask(w0, w1, mode) for w1 in fts]
    signs = [delta_sign(w0, w1) for w1 in fts]
    bins = exponent_bins(w0) if w0.dtype.is_floating_point else None
    return consistency_from_masks(masks, bins, signs)
