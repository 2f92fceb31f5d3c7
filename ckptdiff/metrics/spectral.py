"""Spectral drift and principal-subspace rotation (docs/metrics.md §3) with the equal-norm random null (§2b).

Works on stacks: given (b, m, n) stacks of W0 and W1 it runs one batched SVD per side (and one for the null),
keeping only what it needs between them, and returns one frozen ``SpectralResult`` per matrix.
No I/O, no device choice: tensors stay where they come.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptdiff.metrics.linalg import as_stack, compute_dtype, spectrum_topk, top_singular_value

_RAD2DEG = 180.0 / math.pi


@dataclass(frozen=True)
class SpectralResult:
    """One matrix's §3 row; field names are the CSV column names. Null fields are NaN when no null was asked."""

    k: int
    k_stable: int
    nss: float
    sv_topk_max_rel_change: float
    angle_u_max_deg: float
    angle_v_max_deg: float
    angle_u_mean_deg: float
    angle_v_mean_deg: float
    gap_k: float
    wedin_bound_deg: float
    delta_spectral_norm: float
    delta_rel_fro: float
    delta_stable_rank: float
    nss_per_update: float
    intruders: int
    intruder_cos_min: float
    nss_null: float
    angle_u_max_deg_null: float
    angle_v_max_deg_null: float
    nss_null_ratio: float
    angle_u_max_null_ratio: float
    angle_v_max_null_ratio: float
    intruders_null: float
    # (nss_null, angle_u_max_deg_null, angle_v_max_deg_null) of each further null draw (--null-draws > 1), in draw
    # order; the fields above are the first draw's. Not a CSV column.
    more_nulls: tuple[tuple[float, float, float], ...] = ()


Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # s (b, p), u (b, m, k), v (b, n, k)


@dataclass(frozen=True)
class _Side:
    """What one SVD contributes: full spectrum (b, p), top-k left (b, m, k) and right (b, n, k) bases."""

    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def null_seed(seed: int, name: str) -> int:
    """Per-matrix null seed from the run seed and the tensor name (zlib.crc32), independent of batch composition."""
    return zlib.crc32(f"{seed}:{name}".encode())


def _side(stack: torch.Tensor, k: int, dtype: torch.dtype, k_left: int | None = None) -> _Side:
    """All singular values, the top ``k_left`` (default k) left and top-k right vectors of one side, from one exact
    SVD (see linalg.spectrum_topk)."""
    s, u, v = spectrum_topk(stack, k, dtype, k_left=k_left)
    return _Side(s, u, v)


INTRUDER_K = 10  # PEFT's reduce_intruder_dimension top_k
INTRUDER_EPS = 0.5  # PEFT's threshold_epsilon


def intruders(u_ft: torch.Tensor, u_base: torch.Tensor, eps: float = INTRUDER_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Intruder dimensions (arXiv 2410.21228): per matrix, how many of the fine-tune's top left singular vectors
    ``u_ft`` (b, m, t) have a largest absolute cosine similarity below ``eps`` with every column of the base's left
    singular basis ``u_base`` (b, m, r); and the smallest of those largest cosines. Returns counts (b,), cos_min (b,).
    """
    best = (u_ft.mT @ u_base).abs().amax(-1)  # (b, t): max_j |<u_ft_i, u_base_j>| (unit vectors: the cosines)
    return (best < eps).sum(-1), best.amin(-1)


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, (..., k)) between the column spans of orthonormal a, b (..., m, k).

    cos θ_i = σ_i(aᵀb) clamped to [0, 1]; for angles below 45° the sine form sin θ_i = σ_i(b − a aᵀb) is used
    instead, which keeps tiny angles accurate (arccos loses them near 1). Vectors are never matched by index.
    """
    cos = torch.linalg.svdvals(a.mT @ b).clamp(0.0, 1.0)  # (..., k) descending
    from_cos = torch.arccos(cos)  # ascending
    resid = b - a @ (a.mT @ b)  # (..., m, k)
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).flip(-1)  # ascending
    from_sin = torch.arcsin(sin)
    return torch.where(from_sin < math.pi / 4, from_sin, from_cos)


def _random_like(shape: Sequence[int], seeds: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A (b, m, n) Gaussian stack; matrix i from its own generator seeded with seeds[i] on like's device (fp32)."""
    out = []
    for s in seeds:
        g = torch.Generator(device=like.device).manual_seed(int(s))
        out.append(torch.randn(tuple(shape), generator=g, device=like.device, dtype=torch.float32))
    return torch.stack(out).to(like.dtype)  # (b, m, n)


def _nan_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / b, torch.full_like(a, math.nan))


def spectral_metrics(
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int | None = 64,
    *,
    dtype: torch.dtype = torch.float64,
    null_seeds: Sequence[int] | None = None,
    more_null_seeds: Sequence[Sequence[int]] = (),
    **intruder: Any,
) -> list[SpectralResult]:
    """§3 metrics for each matrix of (b, m, n) stacks (or single (m, n) matrices) W0 and W1, computed in ``dtype``.

    k is capped at min(m, n); None chooses it per matrix: the largest k <= min(64, p − 1) whose gap passes the
    stability test (:func:`stable_k`), else min(64, p − 1). With ``null_seeds`` (one per matrix, e.g. from
    null_seed) the equal-norm random null W0 + R, ‖R‖_F = ‖ΔW‖_F, is evaluated too, and once more per list of
    ``more_null_seeds`` (``SpectralResult.more_nulls``). ``intruder``: intruder_k,
    intruder_eps, intruder_base_k (see :func:`spectral_metrics_with_spectra`). Peak memory is one batched SVD plus
    the inputs.
    """
    return spectral_metrics_with_spectra(
        w0, w1, k, dtype=dtype, null_seeds=null_seeds, more_null_seeds=more_null_seeds, **intruder
    )[0]


def spectral_metrics_with_spectra(
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int | None = 64,
    *,
    dtype: torch.dtype = torch.float64,
    null_seeds: Sequence[int] | None = None,
    more_null_seeds: Sequence[Sequence[int]] = (),
    svds: tuple[Triplets, Triplets] | None = None,
    intruder_k: int = INTRUDER_K,
    intruder_eps: float = INTRUDER_EPS,
    intruder_base_k: int | None = None,
) -> tuple[list[SpectralResult], torch.Tensor, torch.Tensor]:
    """As :func:`spectral_metrics`, plus the full spectra σ(W0), σ(W1) (b, p) from the same SVDs (no extra one).

    Intruder dimensions: the fine-tune's top ``intruder_k`` left singular vectors against the base's top
    ``intruder_base_k`` (None: all p) left ones, threshold ``intruder_eps`` (see :func:`intruders`); the null's
    count uses W0 + R's vectors. ``svds``: (s (b, p), u, v (b, n, k)) of W0 and of W1 in ``dtype`` when they were
    already computed (the engine's shared decompositions), u holding at least the left vectors the intruder count
    needs (W0: max(k, intruder_base_k), W1: max(k, intruder_k)); otherwise each side is decomposed here.
    ``more_null_seeds``: further draws of the null (one list of per-matrix seeds each, beside ``null_seeds``), each
    one more SVD per matrix; their NSS and largest angles are in ``SpectralResult.more_nulls``.
    """
    dt = compute_dtype(dtype)
    a0 = as_stack(w0).to(dt)  # (b, m, n)
    a1 = as_stack(w1).to(dt)  # (b, m, n)
    if a0.shape != a1.shape:
        raise ValueError(f"W0 and W1 stacks differ in shape: {tuple(a0.shape)} vs {tuple(a1.shape)}")
    b, m, n = a0.shape
    p = min(m, n)
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kv = auto_k_max(p) if k is None else min(k, p)  # vectors kept: the most any matrix's k can be
    ik, bk = min(intruder_k, p), p if intruder_base_k is None else min(intruder_base_k, p)
    if null_seeds is not None and len(null_seeds) != b:
        raise ValueError(f"need one null seed per matrix: {len(null_seeds)} seeds for {b} matrices")
    if more_null_seeds and (null_seeds is None or any(len(d) != b for d in more_null_seeds)):
        raise ValueError("further null draws need a first draw and one seed per matrix each")

    delta = a1 - a0  # (b, m, n)
    delta_fro = torch.linalg.matrix_norm(delta)  # (b,)
    delta_2 = top_singular_value(delta, dt)  # (b,) ‖ΔW‖₂: only σ_max of ΔW is used

    side0 = _Side(*svds[0]) if svds is not None else _side(a0, kv, dt, max(kv, bk))
    u_base = side0.u[..., :bk]  # (b, m, bk): the basis intruders are measured against
    side0 = _Side(side0.s, side0.u[..., :kv], side0.v[..., :kv])
    w0_fro = side0.s.norm(dim=-1)  # ‖W0‖_F = ‖σ(W0)‖₂
    k_stable = stable_k(side0.s, delta_2, AUTO_K_MAX)  # (b,)
    # k None: per matrix the largest stable k, else the largest k considered (its angles then say unstable)
    ks = torch.where(k_stable > 0, k_stable, torch.full_like(k_stable, kv)).tolist() if k is None else [kv] * b
    kt = torch.tensor(ks, device=side0.s.device)
    nxt = side0.s.gather(1, kt.clamp(max=p - 1).unsqueeze(1)).squeeze(1)  # σ_{k+1}
    gap = torch.where(kt < p, side0.s.gather(1, (kt - 1).unsqueeze(1)).squeeze(1) - nxt, math.nan)

    side1 = _Side(*svds[1]) if svds is not None else _side(a1, kv, dt, max(kv, ik))
    n_intr, cos_min = intruders(side1.u[..., :ik], u_base, intruder_eps)
    side1 = _Side(side1.s, side1.u[..., :kv], side1.v[..., :kv])
    nss, rel_max, ang_u, ang_v = _drift(side0, side1, w0_fro, ks)
    sigma0, sigma1 = side0.s, side1.s  # (b, p) each
    del side1

    def null_draw(seeds: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """NSS, largest left and right angles and intruder count (b,) each of W0 + R, ‖R‖_F = ‖ΔW‖_F."""
        r = _random_like((m, n), seeds, a0)  # (b, m, n)
        r = r * _nan_div(delta_fro, torch.linalg.matrix_norm(r)).nan_to_num(0.0)[:, None, None]
        side_n = _side(a0 + r, kv, dt, max(kv, ik))
        intr = intruders(side_n.u[..., :ik], u_base, intruder_eps)[0].to(dt)
        side_n = _Side(side_n.s, side_n.u[..., :kv], side_n.v)
        nss_n, _, ang_u_n, ang_v_n = _drift(side0, side_n, w0_fro, ks)
        return nss_n, ang_u_n[0], ang_v_n[0], intr

    if null_seeds is not None:
        nss_null, u_null, v_null, intr_null = null_draw(null_seeds)
    else:
        nss_null = u_null = v_null = intr_null = torch.full_like(w0_fro, math.nan)
    more: list[list[tuple[float, float, float]]] = [[] for _ in range(b)]
    for seeds in more_null_seeds:
        figures = [t.detach().to("cpu", torch.float64).tolist() for t in null_draw(seeds)[:3]]
        for i in range(b):
            more[i].append((figures[0][i], figures[1][i], figures[2][i]))

    rel_fro = _nan_div(delta_fro, w0_fro)
    wedin = torch.arcsin(_nan_div(delta_2, gap).clamp(max=1.0)) * _RAD2DEG
    fields = {
        "nss": nss,
        "sv_topk_max_rel_change": rel_max,
        "angle_u_max_deg": ang_u[0],
        "angle_v_max_deg": ang_v[0],
        "angle_u_mean_deg": ang_u[1],
        "angle_v_mean_deg": ang_v[1],
        "gap_k": gap,
        "wedin_bound_deg": wedin,
        "delta_spectral_norm": delta_2,
        "delta_rel_fro": rel_fro,
        "delta_stable_rank": _nan_div(delta_fro.square(), delta_2.square()),
        "nss_per_update": _nan_div(nss, rel_fro),
        "intruder_cos_min": cos_min,
        "nss_null": nss_null,
        "angle_u_max_deg_null": u_null,
        "angle_v_max_deg_null": v_null,
        "nss_null_ratio": _nan_div(nss, nss_null),
        "angle_u_max_null_ratio": _nan_div(ang_u[0], u_null),
        "angle_v_max_null_ratio": _nan_div(ang_v[0], v_null),
        "intruders_null": intr_null,
    }
    cols = {name: t.detach().to("cpu", torch.float64).tolist() for name, t in fields.items()}
    counts, stable = n_intr.tolist(), k_stable.tolist()
    results = [
        SpectralResult(
            k=ks[i],
            k_stable=int(stable[i]),
            intruders=int(counts[i]),
            more_nulls=tuple(more[i]),
            **{name: vals[i] for name, vals in cols.items()},
        )
        for i in range(b)
    ]
    return results, sigma0, sigma1


AUTO_K_MAX = 64  # --k left out: the largest k considered per matrix


def auto_k_max(p: int) -> int:
    """The most top vectors a matrix with p = min(m, n) needs when k is chosen per matrix: min(64, p − 1), >= 1."""
    return max(1, min(AUTO_K_MAX, p - 1))


def stable_k(s0: torch.Tensor, delta_2: torch.Tensor, k_max: int = AUTO_K_MAX) -> torch.Tensor:
    """Per matrix, the largest k <= min(k_max, p − 1) whose gap passes the stability test, 0 when none: (b,) int64.

    The test is the one the ``angles`` column applies: the Wedin bound arcsin(‖ΔW‖₂ / γ_k) below 45°, i.e.
    γ_k = σ_k − σ_{k+1} > √2 ‖ΔW‖₂ (and γ_k > 0). ``s0`` (b, p) is W0's spectrum, descending; ``delta_2`` (b,).
    """
    b, p = s0.shape
    top = min(k_max, p - 1)
    if top < 1:
        return torch.zeros(b, dtype=torch.int64, device=s0.device)
    gaps = s0[:, :top] - s0[:, 1 : top + 1]  # (b, top): γ_1 .. γ_top
    ok = (gaps > math.sqrt(2.0) * delta_2.unsqueeze(1)) & (gaps > 0)
    ks = torch.arange(1, top + 1, device=s0.device).expand(b, top)
    return torch.where(ok, ks, torch.zeros_like(ks)).amax(1)


def _drift(
    side0: _Side, side1: _Side, w0_fro: torch.Tensor, ks: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """NSS (b,), the largest top-k relative σ change (b,), and the (largest, mean) left and right principal angles in
    degrees ((b,), (b,)) each, matrix i over its own top ``ks[i]`` (matrices sharing a k computed together)."""
    nss = _nan_div((side1.s - side0.s).norm(dim=-1), w0_fro)
    b = nss.shape[0]
    rel_max = torch.empty_like(nss)
    u_max, u_mean, v_max, v_mean = (torch.empty_like(nss) for _ in range(4))
    for k in sorted(set(ks)):
        rows = [i for i in range(b) if ks[i] == k]
        idx = torch.tensor(rows, device=nss.device)

        def pick(t: torch.Tensor, idx: torch.Tensor = idx, whole: bool = len(rows) == b) -> torch.Tensor:
            return t if whole else t.index_select(0, idx)

        s0, s1 = pick(side0.s)[:, :k], pick(side1.s)[:, :k]
        rel_max[idx] = ((s1 - s0).abs() / s0).amax(-1)  # inf where σ_i(W0) = 0 and it moved
        ang_u = principal_angles(pick(side0.u)[..., :k], pick(side1.u)[..., :k]) * _RAD2DEG
        ang_v = principal_angles(pick(side0.v)[..., :k], pick(side1.v)[..., :k]) * _RAD2DEG
        u_max[idx], u_mean[idx] = ang_u.amax(-1), ang_u.mean(-1)
        v_max[idx], v_mean[idx] = ang_v.amax(-1), ang_v.mean(-1)
    return nss, rel_max, (u_max, u_mean), (v_max, v_mean)
