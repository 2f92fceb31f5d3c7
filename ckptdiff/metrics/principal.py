"""Principal-weight overlap (docs/metrics.md §2) and its confound controls (§2b), as pure tensor functions.

Inputs are one (m, n) weight matrix, its update mask and the top-k singular triplets of W0 (from
``ckptdiff.linalg``). Outputs are a frozen ``PrincipalResult`` of floats and exact integer counts, and
optionally the three masks. No I/O, no device choice: tensors stay where they come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ckptdiff.metrics.mask import exponent_bins, magnitude_matched_overlap
from ckptdiff.numeric import ratio

# Integer views whose order equals the float order for non-negative values (sign bit cleared).
_KEY_VIEW: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 32),
    torch.float64: (torch.int64, 64),
}
_RADIX_BITS = 16


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


def rank_k_magnitude(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|W0^(k)| = |U_k diag(S_k) V_k^T| from u (..., m, k), s (..., k), v (..., n, k); returns (..., m, n)."""
    return ((u * s.unsqueeze(-2)) @ v.mT).abs()  # (..., m, k) @ (..., k, n)


def _sort_keys(score: torch.Tensor) -> torch.Tensor:
    """Flat integer keys ordered like |score| (NaN above +inf); bf16/fp16 scores are widened to fp32 exactly."""
    x = score.reshape(-1)  # (numel,)
    if x.dtype not in _KEY_VIEW:
        x = x.to(torch.float32)
    int_dtype, nbits = _KEY_VIEW[x.dtype]
    sign_off = torch.tensor((1 << (nbits - 1)) - 1, dtype=int_dtype, device=x.device)
    return x.contiguous().view(int_dtype) & sign_off


def kth_smallest_key(keys: torch.Tensor, rank: int, nbits: int) -> int:
    """The rank-th smallest (0-based) of non-negative integer keys below 2^(nbits-1), by radix (bucket) select.

    Each pass histograms the next 16 bits of the surviving candidates (``torch.bincount``) and keeps only the bucket
    holding the rank-th key, so the work after the first pass is tiny. Device-agnostic and O(numel).
    Threshold of a 4096x4096 fp32 matrix, alpha = 0.5 (bench_svd.py): on 1 loaded CPU thread radix 0.11 s,
    torch.kthvalue 0.41 s, torch.topk 1.73 s, torch.sort 4.15 s (np.partition 0.11 s, CPU-only); on an H100 radix
    0.002 s, topk/sort 0.001 s, kthvalue 0.13 s. Radix is the fastest device-agnostic choice on CPU and costs
    nothing that matters on GPU, so it is used everywhere.
    """
    cand = keys
    prefix = 0
    shift = nbits - 1  # bits still to resolve (the sign bit is zero)
    while shift > 0:
        width = min(_RADIX_BITS, shift)
        shift -= width
        digit = cand >> shift if shift else cand
        if prefix or cand is not keys:  # earlier passes fixed the high bits; the first pass needs no mask
            digit = digit & ((1 << width) - 1)
        counts = torch.bincount(digit, minlength=1 << width)
        cum = torch.cumsum(counts, 0)
        bucket = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device), right=True))
        if bucket > 0:
            rank -= int(cum[bucket - 1])
        prefix = (prefix << width) | bucket
        cand = cand[digit == bucket]
    return prefix


def select_mask(score: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """Bool mask of exactly ``count`` entries with the largest (or smallest) |score|, same shape as ``score``.

    Ties at the threshold are broken by flat (row-major) index: lower index first, for both largest and smallest.
    NaN ranks above +inf. The threshold is found by radix select on the float bit patterns (kth_smallest_key).
    """
    keys = _sort_keys(score)  # (numel,)
    numel = keys.numel()
    if count <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if count >= numel:
        return torch.ones_like(score, dtype=torch.bool)
    nbits = 8 * keys.element_size()
    rank = numel - count if largest else count - 1
    thr = torch.tensor(kth_smallest_key(keys, rank, nbits), dtype=keys.dtype, device=keys.device)
    strict = keys > thr if largest else keys < thr
    ties = keys == thr
    need = count - int(torch.count_nonzero(strict))
    if need < int(torch.count_nonzero(ties)):
        first = torch.nonzero(ties).squeeze(1)[:need]  # ascending flat indices of tied entries
        ties = torch.zeros_like(ties)
        ties[first] = True
    return (strict | ties).reshape(score.shape)


def region_masks(w0: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, alpha: float) -> PrincipalMasks:
    """Principal (top alpha·m·n of |W0^(k)|), low (bottom alpha·m·n of |W0|) and principal ∩ not-low masks."""
    count = mask_size(alpha, w0.numel())
    principal = select_mask(rank_k_magnitude(u, s, v), count, largest=True)
    low = select_mask(w0, count, largest=False)
    return PrincipalMasks(principal, low, principal & ~low)


def overlap(region: torch.Tensor, update: torch.Tensor) -> float:
    """|region ∩ update| / |update|; NaN when the update is empty."""
    changed = int(torch.count_nonzero(update))
    return ratio(int(torch.count_nonzero(region & update)), changed)


def update_energy(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[float, float, float, float]:
    """(‖ΔW‖_F², E_k, left, right): ‖U_kᵀΔV_k‖², ‖U_kᵀΔ‖², ‖ΔV_k‖² over ‖Δ‖_F², computed in u's dtype; NaN for Δ = 0."""
    d = delta.to(u.dtype)
    total = float(d.square().sum())
    left = u.mT @ d  # (k, n)
    right = d @ v  # (m, k)
    both = left @ v  # (k, k)
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
    d = delta if delta is not None else w1.to(u.dtype) - w0.to(u.dtype)  # type: ignore[union-attr]
    upd = update.to(torch.bool)
    masks = region_masks(w0, u, s, v, alpha)
    b = exponent_bins(w0) if bins is None else bins
    numel = w0.numel()
    changed = int(torch.count_nonzero(upd))
    sizes = [int(torch.count_nonzero(x)) for x in (masks.principal, masks.low, masks.principal_not_low)]
    hits = [int(torch.count_nonzero(x & upd)) for x in (masks.principal, masks.low, masks.principal_not_low)]
    over = [ratio(h, changed) for h in hits]
    base = sizes[0] / numel
    base_pnl = sizes[2] / numel
    mag = [magnitude_matched_overlap(b, upd, x) for x in (masks.principal, masks.low, masks.principal_not_low)]
    fro_sq, e_k, e_left, e_right = update_energy(d, u, v)
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
