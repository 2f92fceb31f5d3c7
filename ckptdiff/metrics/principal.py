"""Principal-weight overlap (docs/metrics.md §2) and its confound controls (§2b), as pure tensor functions.

Inputs are one (m, n) weight matrix, its update mask and the top-k singular triplets of W0 (from
``ckptdiff.metrics.linalg``). Outputs are a frozen ``PrincipalResult`` of floats and exact integer counts, and
optionally the three masks. No I/O, no device choice: tensors stay where they come.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from ckptdiff import dtypes
from ckptdiff.metrics.mask import joint_bin_counts, matched_overlap
from ckptdiff.metrics.numeric import ratio

# Integer views whose order equals the float order for non-negative values (sign bit cleared).
_KEY_VIEW: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 16),
    torch.float16: (torch.int16, 16),
    torch.float32: (torch.int32, 32),
    torch.float64: (torch.int64, 64),
}
_RADIX_BITS = 16
_BIG_ENDIAN = sys.byteorder == "big"
# (narrow, wide) float pairs where every narrow value is exact in wide.


@dataclass(frozen=True)
class PrincipalResult:
    """One matrix's §2/§2b row; field names are the CSV column names."""

    k: int
    alpha: float
    svd: str
    numel: int
    changed: int
    update_density: float
    # Mask sizes (exact counts) and |mask ∩ update| counts, so rollups can be weighted exactly.
    principal_size: int
    low_size: int
    principal_not_low_size: int
    changed_principal: int
    changed_low: int
    changed_principal_not_low: int
    # Overlaps |M• ∩ M| / |M| and their naive random baselines (mask densities).
    overlap_principal: float
    overlap_low: float
    overlap_principal_not_low: float
    baseline: float
    baseline_principal_not_low: float
    ratio_principal: float
    ratio_low: float
    ratio_principal_not_low: float
    # Magnitude-matched baselines (exponent bins of W0) and overlap / baseline.
    baseline_principal_magnitude: float
    baseline_low_magnitude: float
    baseline_principal_not_low_magnitude: float
    ratio_principal_magnitude: float
    ratio_low_magnitude: float
    # Update energy in the principal subspace vs the isotropic random value.
    delta_fro_sq: float
    energy_principal: float
    energy_principal_random: float
    energy_left: float
    energy_left_random: float
    energy_right: float
    energy_right_random: float


@dataclass(frozen=True)
class PrincipalMasks:
    """The three (m, n) bool region masks behind a PrincipalResult (for ``--save-masks``)."""

    principal: torch.Tensor
    low: torch.Tensor
    principal_not_low: torch.Tensor


def mask_size(alpha: float, numel: int) -> int:
    """Exact mask size: round(alpha * numel) with halves rounded up, i.e. floor(alpha * numel + 0.5), in [0, numel]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return min(numel, max(0, math.floor(alpha * numel + 0.5)))


def rank_k_magnitude(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """|W0^(k)| = |U_k diag(S_k) V_k^T| from u (..., m, k), s (..., k), v (..., n, k); returns (..., m, n).

    ``out``: an (..., m, n) tensor of u's dtype to write it into (a scratch buffer; saves a fresh allocation).
    """
    return torch.matmul(u * s.unsqueeze(-2), v.mT, out=out).abs_()  # (..., m, k) @ (..., k, n)


def _sort_keys(score: torch.Tensor) -> torch.Tensor:
    """Flat integer keys ordered like |score| (NaN above +inf): its bit pattern with the sign bit cleared.

    Floats keep their own width (bf16/fp16 give 16-bit keys: widening to fp32 would keep the order and the ties, so
    the selection is the same with half the bytes and a single radix pass; NaNs are ordered by their own payload
    bits); any other dtype is widened to fp32.
    """
    x = score.reshape(-1)  # (numel,)
    if x.dtype not in _KEY_VIEW:
        x = x.to(torch.float32)
    int_dtype, nbits = _KEY_VIEW[x.dtype]
    return x.contiguous().view(int_dtype) & ((1 << (nbits - 1)) - 1)


def _radix_select(keys: torch.Tensor, rank: int, nbits: int) -> tuple[int, int, int]:
    """(value, below, equal): the rank-th smallest (0-based) key and how many keys lie below it and equal it.

    Each pass histograms the next 16 bits of the surviving candidates (``torch.bincount``) and keeps only the bucket
    holding the rank-th key; the last pass's bucket count is the number of keys equal to it.
    """
    cand = keys
    prefix = below = 0
    shift = nbits - 1  # bits still to resolve (the sign bit is zero)
    while True:
        if cand is keys and nbits == 32 and not _BIG_ENDIAN:
            width, shift = 15, 16  # the high halves, read through an int16 view instead of a shifted copy
            digit = keys.view(torch.int16).view(-1, 2)[:, 1]
        else:
            width = min(_RADIX_BITS, shift)
            shift -= width
            digit = cand >> shift if shift else cand
            if cand is not keys:  # earlier passes fixed the high bits; the first pass needs no mask
                digit = digit & ((1 << width) - 1)
        counts = torch.bincount(digit, minlength=1 << width)
        cum = torch.cumsum(counts, 0)
        bucket = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device), right=True))
        if bucket > 0:
            lower = int(cum[bucket - 1])
            rank -= lower
            below += lower
        prefix = (prefix << width) | bucket
        if shift == 0:
            return prefix, below, int(counts[bucket])
        cand = cand[digit == bucket]


def kth_smallest_key(keys: torch.Tensor, rank: int, nbits: int) -> int:
    """The rank-th smallest (0-based) of non-negative integer keys below 2^(nbits-1), by radix (bucket) select.

    Each pass histograms the next 16 bits of the surviving candidates (``torch.bincount``) and keeps only the bucket
    holding the rank-th key, so the work after the first pass is tiny. Device-agnostic and O(numel).
    Threshold of a 4096x4096 fp32 matrix, alpha = 0.5 (bench_svd.py): on 1 loaded CPU thread radix 0.11 s,
    torch.kthvalue 0.41 s, torch.topk 1.73 s, torch.sort 4.15 s (np.partition 0.11 s, CPU-only); on an H100 radix
    0.002 s, topk/sort 0.001 s, kthvalue 0.13 s. Radix is the fastest device-agnostic choice on CPU and costs
    nothing that matters on GPU, so it is used everywhere.
    """
    return _radix_select(keys, rank, nbits)[0]


def select_mask(score: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """Bool mask of exactly ``count`` entries with the largest (or smallest) |score|, same shape as ``score``.

    Ties at the threshold are broken by flat (row-major) index: lower index first, for both largest and smallest.
    NaN ranks above +inf. The threshold is found by radix select on the float bit patterns (_radix_select), which
    also counts the keys below and at it: when every tie is taken the mask is one comparison.
    """
    return _select_keys(_sort_keys(score), count, largest=largest).reshape(score.shape)


def _select_keys(keys: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """select_mask on flat non-negative integer keys (see _sort_keys); returns a flat bool mask."""
    numel = keys.numel()
    if count <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if count >= numel:
        return torch.ones_like(keys, dtype=torch.bool)
    nbits = 8 * keys.element_size()
    rank = numel - count if largest else count - 1
    thr, below, equal = _radix_select(keys, rank, nbits)
    strict = numel - below - equal if largest else below  # keys strictly beyond the threshold, all taken
    need = count - strict  # tied keys to take, 1..equal
    if need == equal:
        mask = keys >= thr if largest else keys <= thr
    else:
        mask = keys > thr if largest else keys < thr
        first = torch.nonzero(keys == thr).squeeze(1)[:need]  # ascending flat indices of tied entries
        mask[first] = True
    return mask


def region_masks(
    w0: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    *,
    scratch: torch.Tensor | None = None,
) -> PrincipalMasks:
    """Principal (top alpha·m·n of |W0^(k)|), low (bottom alpha·m·n of |W0|) and principal ∩ not-low masks.

    ``scratch``: an (m, n) tensor of u's dtype that |W0^(k)| may overwrite.
    """
    count = mask_size(alpha, w0.numel())
    score = rank_k_magnitude(u, s, v, out=scratch).reshape(-1)  # (m n,) fp32/fp64, sign bits already clear
    principal = _select_keys(score.view(_KEY_VIEW[score.dtype][0]), count, largest=True).reshape(w0.shape)
    del score
    low = select_mask(w0, count, largest=False)
    return PrincipalMasks(principal, low, principal & ~low)


def overlap(region: torch.Tensor, update: torch.Tensor) -> float:
    """|region ∩ update| / |update|; NaN when the update is empty."""
    changed = int(torch.count_nonzero(update))
    return ratio(int(torch.count_nonzero(region & update)), changed)


def difference(w1: torch.Tensor, w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W1 - W0 in ``dtype``, equal to ``w1.to(dtype) - w0.to(dtype)`` bit for bit, with one temporary fewer.

    The subtraction runs in place on the copy of W1; W0 goes in as it is when it widens to ``dtype`` exactly (the
    promoted subtraction is then the same operation), else rounded to ``dtype`` first as before.
    """
    d = w1.to(dtype, copy=True)
    return d.sub_(w0 if w0.dtype == dtype or (w0.dtype, dtype) in dtypes.WIDENS_EXACTLY else w0.to(dtype))


def update_energy(
    delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *, overwrite: bool = False
) -> tuple[float, float, float, float]:
    """(‖ΔW‖_F², E_k, left, right): ‖U_kᵀΔV_k‖², ‖U_kᵀΔ‖², ‖ΔV_k‖² over ‖Δ‖_F², computed in u's dtype; NaN for Δ = 0.

    ``overwrite``: ``delta`` (already in u's dtype) is scratch and is squared in place, saving an (m, n) temporary.
    """
    d = delta.to(u.dtype)
    left = u.mT @ d  # (k, n)
    right = d @ v  # (m, k)
    both = left @ v  # (k, k)
    total = float((d.square_() if overwrite and d is delta else d.square()).sum())
    if total == 0.0:
        return 0.0, math.nan, math.nan, math.nan
    return (
        total,
        float(both.square().sum()) / total,
        float(left.square().sum()) / total,
        float(right.square().sum()) / total,
    )


def principal_metrics_with_masks(
    w0: torch.Tensor,
    update: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    alpha: float = 0.5,
    *,
    w1: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    svd: str = "exact",
    bins: torch.Tensor | None = None,
) -> tuple[PrincipalResult, PrincipalMasks]:
    """§2/§2b metrics of one (m, n) matrix plus its region masks.

    ``w0`` in its storage dtype (bins and |W0| use it); ``update`` the (m, n) bool update mask; ``u`` (m, k),
    ``s`` (k,), ``v`` (n, k) the top-k triplets of W0 (fp32/fp64); exactly one of ``w1`` or ``delta``;
    ``svd`` the method label recorded in the row; ``bins`` precomputed exponent_bins(w0) if available.
    """
    if (w1 is None) == (delta is None):
        raise ValueError("pass exactly one of w1= or delta=")
    if w0.dim() != 2 or update.shape != w0.shape:
        raise ValueError(f"need a 2-D w0 and an update mask of its shape, got {tuple(w0.shape)}, {tuple(update.shape)}")
    m, n = w0.shape
    k = s.shape[-1]
    owned = delta is None  # d is this function's scratch: squared in place, then overwritten by |W0^(k)|
    d = difference(w1, w0, u.dtype) if owned else delta  # type: ignore[arg-type]
    fro_sq, e_k, e_left, e_right = update_energy(d, u, v, overwrite=owned)  # type: ignore[arg-type]
    upd = update.to(torch.bool)
    masks = region_masks(w0, u, s, v, alpha, scratch=d if owned else None)
    del d
    numel = w0.numel()
    # Every count below, per magnitude bin and in total, from one joint histogram of (bin, update, principal, low).
    table = joint_bin_counts(w0, upd, masks.principal, masks.low, bins=bins)  # (8, slots); row = U + 2 P + 4 L
    t = table.view(2, 2, 2, -1)  # [L, P, U, slot]
    per_bin = [t.sum((0, 1, 2)), t[:, :, 1].sum((0, 1)), t[:, 1].sum((0, 1)), t[1].sum((0, 1)), t[0, 1].sum(0)]
    hit = [t[:, 1, 1].sum(0), t[1, :, 1].sum(0), t[0, 1, 1]]  # per bin: U∩P, U∩L, U∩P∩¬L
    totals = torch.stack([c.sum() for c in per_bin[1:] + hit]).tolist()  # |U|, |P|, |L|, |P∩¬L|, hits
    changed, sizes, hits = totals[0], totals[1:4], totals[4:7]
    over = [ratio(h, changed) for h in hits]
    base = sizes[0] / numel
    base_pnl = sizes[2] / numel
    n_b, u_b = per_bin[0].to(torch.float64), per_bin[1].to(torch.float64)
    mag = [matched_overlap(n_b, u_b, c_b.to(torch.float64)) for c_b in per_bin[2:]]
    result = PrincipalResult(
        k=k,
        alpha=alpha,
        svd=svd,
        numel=numel,
        changed=changed,
        update_density=changed / numel,
        principal_size=sizes[0],
        low_size=sizes[1],
        principal_not_low_size=sizes[2],
        changed_principal=hits[0],
        changed_low=hits[1],
        changed_principal_not_low=hits[2],
        overlap_principal=over[0],
        overlap_low=over[1],
        overlap_principal_not_low=over[2],
        baseline=base,
        baseline_principal_not_low=base_pnl,
        ratio_principal=ratio(over[0], base),
        ratio_low=ratio(over[1], sizes[1] / numel),
        ratio_principal_not_low=ratio(over[2], base_pnl),
        baseline_principal_magnitude=mag[0],
        baseline_low_magnitude=mag[1],
        baseline_principal_not_low_magnitude=mag[2],
        ratio_principal_magnitude=ratio(over[0], mag[0]),
        ratio_low_magnitude=ratio(over[1], mag[1]),
        delta_fro_sq=fro_sq,
        energy_principal=e_k,
        energy_principal_random=k * k / (m * n),
        energy_left=e_left,
        energy_left_random=k / m,
        energy_right=e_right,
        energy_right_random=k / n,
    )
    return result, masks


def principal_metrics(
    w0: torch.Tensor,
    update: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    alpha: float = 0.5,
    *,
    w1: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    svd: str = "exact",
    bins: torch.Tensor | None = None,
) -> PrincipalResult:
    """§2/§2b metrics of one (m, n) matrix (see principal_metrics_with_masks for the arguments)."""
    result, _ = principal_metrics_with_masks(w0, update, u, s, v, alpha, w1=w1, delta=delta, svd=svd, bins=bins)
    return result
