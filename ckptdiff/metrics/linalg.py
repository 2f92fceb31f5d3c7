"""SVD machinery shared by the principal-weight (docs/metrics.md §2) and spectral (§3) analyses.

Exact batched SVD / svdvals, the full spectrum plus top-k vectors (spectrum_topk) and σ_max alone
(top_singular_value), randomized top-k (``torch.svd_lowrank``'s algorithm), the computation dtype rule (fp32 or
fp64, never bf16: inputs are upcast), a memory-budget batch planner and the ``auto`` method rule.
Everything is device-agnostic: tensors stay on the device they arrive on, so the GPU path is the same code; the
CPU-only routes (QR first, Gram eigenvalue, one-thread thin LAPACK calls) are exact alternatives chosen by
measurement on CPU, and GPUs keep the plain calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["exact", "randomized", "auto"]
Work = Literal["svd", "svdvals", "randomized"]

COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# Randomized top-k defaults: q = k + max(OVERSAMPLE_MIN, ceil(OVERSAMPLE_FRAC * k)) columns, NITER power iterations.
# Chosen so the rank-k principal mask agrees with the exact one on >= 99% of entries for slowly decaying spectra
# (sigma_i ~ i^-0.5 plus noise, the hard case; see tests/metrics/test_linalg.py and benchmarks/bench_svd.py).
# Measured on 512x256, k=64: q=k+10, niter=2 gave 87%; q=2k, niter=4 99.2%; q=2k, niter=6 99.8%.
# On 7B shapes: 99.88-99.89%.
OVERSAMPLE_MIN = 10
OVERSAMPLE_FRAC = 1.0
NITER = 6

# "auto" picks randomized only when it is clearly cheaper: min(m, n) >= AUTO_MIN_DIM and q <= min(m, n) / AUTO_RATIO.
AUTO_MIN_DIM = 1024
AUTO_RATIO = 8

# LAPACK block size assumed in the workspace estimate (ilaenv's typical nb for gesdd / gebrd).
_LAPACK_NB = 64


@dataclass(frozen=True)
class TopK:
    """Top-k singular triplets of a stack: ``u`` (b, m, k), ``s`` (b, k), ``v`` (b, n, k), and how they were found."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    method: Literal["exact", "randomized"]
    oversample: int = 0
    niter: int = 0
    seed: int | None = None

    def describe(self) -> str:
        """The ``svd`` column of a CSV row: 'exact' or 'randomized(q=74,niter=4,seed=0)'."""
        if self.method == "exact":
            return "exact"
        q = self.s.shape[-1] + self.oversample
        return f"randomized(q={q},niter={self.niter},seed={self.seed})"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Validate a computation dtype: fp32 or fp64 only (bf16/fp16 SVD is never used)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"SVD computation dtype must be float32 or float64, got {dtype}")
    return dtype


def upcast(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` in the computation dtype on its own device (no copy when it already is)."""
    return x.to(compute_dtype(dtype))


def as_stack(x: torch.Tensor) -> torch.Tensor:
    """View a single (m, n) matrix as a (1, m, n) stack; stacks pass through."""
    if x.dim() == 2:
        return x.unsqueeze(0)  # (1, m, n)
    if x.dim() != 3:
        raise ValueError(f"expected an (m, n) matrix or a (b, m, n) stack, got shape {tuple(x.shape)}")
    return x


def finite_rows(stack: torch.Tensor) -> list[bool]:
    """Per matrix of a (b, m, n) stack (or one (m, n) matrix): whether every entry is finite.

    One whole-matrix ``torch.aminmax`` per matrix in the storage dtype (NaN propagates to both ends, ±inf shows at
    one), instead of ``isfinite``'s full-size bool temporary; integer matrices are always finite. Measured on a
    4 x 4096^2 bf16 stack, 2 loaded CPU threads: isfinite(...).all(1) 0.66 s, aminmax(dim=1) 0.32 s, one aminmax per
    matrix 0.024 s.
    """
    a = as_stack(stack)
    if not a.dtype.is_floating_point or a.numel() == 0:
        return [True] * a.shape[0]
    ends = torch.stack([torch.stack(torch.aminmax(x)) for x in a.reshape(a.shape[0], -1)])  # (b, 2)
    return torch.isfinite(ends).all(1).tolist()


def svd(stack: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact economy SVD of a (b, m, n) stack in ``dtype``: U (b, m, p), S (b, p), Vh (b, p, n), p = min(m, n)."""
    u, s, vh = torch.linalg.svd(upcast(as_stack(stack), dtype), full_matrices=False)
    return u, s, vh


def svdvals(stack: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values (b, p) of a (b, m, n) stack in ``dtype``, descending."""
    return torch.linalg.svdvals(upcast(as_stack(stack), dtype))


# spectrum_topk factors the long side by QR first (CPU) when max(m, n) >= QR_FIRST_RATIO * min(m, n). Measured on one
# CPU thread (load ~2.3), fp64, k=64, full SVD vs spectrum_topk: 2048x5504 14.6 s vs 5.8 s, 5504x2048 7.7 s vs 5.6 s
# (benchmarks/bench_spectral.py --pieces); full SVD vs QR + SVD of the factor: 1536x2048 2.5 s vs 2.0 s,
# 2048x2048 4.3 s vs 5.2 s.
QR_FIRST_RATIO = 4 / 3


def spectrum_topk(
    stack: torch.Tensor, k: int, dtype: torch.dtype = torch.float64, k_left: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every singular value and the top-k singular vectors of a (b, m, n) stack, exactly, in ``dtype``.

    Returns s (b, p) descending, u (b, m, k_left), v (b, n, k), p = min(m, n); ``k_left`` (default k) asks for
    more (or fewer) left vectors than right ones, e.g. the whole left basis for intruder dimensions. A square-ish
    stack goes through ``torch.linalg.svd``. On CPU a rectangular one (aspect >= QR_FIRST_RATIO) is first factored
    A = Q R along its long side (``torch.geqrf``, Householder), then R (p, p) gets the SVD and only the wanted
    long-side vectors are mapped back through Q (``torch.ormqr``): LAPACK's own SVD forms all of Q and multiplies
    all p vectors back, which measured 1.4-2.5x slower on 7B aspect ratios (see QR_FIRST_RATIO). Both are
    backward-stable exact SVDs; vectors may differ in sign (which subspace angles ignore).
    """
    a = upcast(as_stack(stack), dtype)
    b, m, n = a.shape
    p = min(m, n)
    k = _check_k(k, p)
    kl = k if k_left is None else _check_k(k_left, p)
    if a.device.type != "cpu" or max(m, n) < QR_FIRST_RATIO * p:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s, u[..., :kl].contiguous(), vh[..., :k, :].mT.contiguous()
    tall = m >= n
    x = a if tall else a.mT  # (b, M, p), M > p
    k_long, k_short = (kl, k) if tall else (k, kl)
    qr, tau = torch.geqrf(x)  # x = Q R, Householder vectors below the diagonal
    ur, s, vh = torch.linalg.svd(qr[..., :p, :].triu(), full_matrices=False)  # R = Ur S Vh, (b, p, p) each
    lead = x.new_zeros(b, x.shape[-2], k_long)  # (b, M, k_long): [Ur_k; 0]
    lead[..., :p, :] = ur[..., :k_long]
    long_side = torch.ormqr(qr, tau, lead)  # Q [Ur_k; 0] = the top vectors of x's long side (b, M, k_long)
    short_side = vh[..., :k_short, :].mT.contiguous()  # (b, p, k_short)
    return (s, long_side, short_side) if tall else (s, short_side, long_side)


def top_singular_value(stack: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """σ_max of each matrix of a (b, m, n) stack in ``dtype``: (b,).

    On CPU: the square root of the largest eigenvalue of the (p, p) Gram matrix (``torch.linalg.eigvalsh``), which
    needs no bidiagonalisation of the whole matrix (one CPU thread, fp64, vs ``svdvals``: 2048x5504 1.8 s vs 10.2 s,
    5504x2048 2.2 s vs 5.0 s, 2048x2048 1.1 s vs 2.2 s; benchmarks/bench_spectral.py --pieces). The largest
    eigenvalue of a symmetric matrix moves by no more than the rounding error of the Gram product, so σ_max agrees
    with svdvals to a few ulps (measured 2e-16 .. 3e-15 relative). Elsewhere: ``svdvals``.
    """
    a = upcast(as_stack(stack), dtype)
    if a.device.type != "cpu":
        return torch.linalg.svdvals(a)[..., 0]
    m, n = a.shape[-2:]
    gram = a @ a.mT if m <= n else a.mT @ a  # (b, p, p)
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0).sqrt()


def oversample_for(k: int) -> int:
    """Default oversampling for a rank-k randomized SVD: max(OVERSAMPLE_MIN, ceil(OVERSAMPLE_FRAC * k))."""
    return max(OVERSAMPLE_MIN, math.ceil(OVERSAMPLE_FRAC * k))


def randomized_topk(
    stack: torch.Tensor,
    k: int,
    *,
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    niter: int = NITER,
    seed: int = 0,
) -> TopK:
    """Top-k triplets of a (b, m, n) stack by ``torch.svd_lowrank``'s algorithm (Halko et al. 2009, Alg. 5.1).

    Sketches q = k + oversample columns with ``niter`` QR-stabilised power iterations; the global RNG is forked
    and seeded with ``seed`` so the call is repeatable and leaves the caller's RNG state alone (see lowrank_svd).
    """
    a = upcast(as_stack(stack), dtype)
    p = min(a.shape[-2:])
    k = _check_k(k, p)
    over = oversample_for(k) if oversample is None else oversample
    q = min(k + over, p)
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = lowrank_svd(a, q, niter)
    return TopK(
        u[..., :k].contiguous(),
        s[..., :k].contiguous(),
        v[..., :k].contiguous(),
        "randomized",
        oversample=q - k,
        niter=niter,
        seed=seed,
    )


@contextlib.contextmanager
def _serial_lapack(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU LAPACK calls on one thread (GPU work is left alone); the thread count is restored after.

    A thin QR (m, q) or the SVD of a (q, n) sketch synchronises its threads once per column block: on cores shared
    with other processes a descheduled thread stalls every barrier, and one thread is faster. Measured on 2 shared
    cores (load 3.4), 4 x (4096, 128) fp32, 6 interleaved runs: QR 0.049 s on 1 thread vs a median 0.70 s
    (0.03 .. 1.2 s) on 2; SVD of 4 x (128, 4096) 0.15 s vs 2.0 s (0.35 .. 12.7 s); with OMP_WAIT_POLICY=PASSIVE
    QR 0.038 s vs 0.88 s. On an idle machine two threads would save ~0.01 s per QR. The matmuls, which hold the
    flops, keep every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lowrank_svd(a: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(a, q, niter)`` op for op (same random draw, same products), with its thin QRs and the small
    SVD on one CPU thread (_serial_lapack): u (b, m, q), s (b, q), v (b, n, q).

    Halko et al. 2009: Q spans A R for a Gaussian R (n, q), refined by ``niter`` QR-stabilised power iterations;
    then the SVD of B = Qᴴ A (q, n) gives u = Q U_B. A wide A is handled through its transpose, as torch does.
    """
    m, n = a.shape[-2:]
    x = a if m >= n else a.mH  # (b, M, N), M >= N
    r = torch.randn(x.shape[-1], q, dtype=x.dtype, device=x.device)  # (N, q)
    y = x @ r  # (b, M, q)
    with _serial_lapack(x.device):
        basis = torch.linalg.qr(y).Q
    for _ in range(niter):
        y = x.mH @ basis  # (b, N, q)
        with _serial_lapack(x.device):
            basis = torch.linalg.qr(y).Q
        y = x @ basis  # (b, M, q)
        with _serial_lapack(x.device):
            basis = torch.linalg.qr(y).Q
    b = basis.mH @ x  # (b, q, N)
    with _serial_lapack(x.device):
        ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u, v = basis @ ub, vh.mH  # (b, M, q), (b, N, q)
    return (u, s, v) if m >= n else (v, s, u)


def exact_topk(stack: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float32) -> TopK:
    """Top-k triplets of a (b, m, n) stack from the exact economy SVD."""
    u, s, vh = svd(stack, dtype)
    k = _check_k(k, s.shape[-1])
    # Copies, so the full U (b, m, p) and Vh (b, p, n) are freed instead of kept alive by views.
    return TopK(u[..., :k].contiguous(), s[..., :k].contiguous(), vh[..., :k, :].mT.contiguous(), "exact")


FLOPS = 5e9  # floating-point operations per second assumed for one core when balancing work (only ratios matter)


def svd_seconds(m: int, n: int, k: int, method: str) -> float:
    """A rough cost model of one SVD of an (m, n) matrix, for sharing work fairly between ranks.

    Exact (full economy SVD): about 6·m·n·min(m, n) flops. Randomized top-k: about (2·niter + 4) passes of an
    (m, n) × (n, q) product with q = k + oversampling, plus the small SVD.
    """
    p = min(m, n)
    if method == "randomized":
        q = min(k + oversample_for(k), p)
        return ((2 * NITER + 4) * 2 * m * n * q + 6 * q * q * max(m, n)) / FLOPS
    return 6 * m * n * p / FLOPS


def choose_method(m: int, n: int, k: int, method: SvdMethod = "auto", oversample: int | None = None) -> str:
    """Resolve ``auto``: randomized iff min(m, n) >= AUTO_MIN_DIM and q = k + oversample <= min(m, n) / AUTO_RATIO.

    Exact SVD costs O(m n p) with a large constant; randomized costs about (2 niter + 2) m n q flops in matmuls plus
    QRs of (m, q) and (n, q). With q <= p / 8 that is several times cheaper on large matrices; on small ones LAPACK
    is fast anyway and exactness wins (bench_svd.py has the measurements).
    """
    if method != "auto":
        return method
    p = min(m, n)
    q = k + (oversample_for(k) if oversample is None else oversample)
    return "randomized" if p >= AUTO_MIN_DIM and q * AUTO_RATIO <= p else "exact"


def topk(
    stack: torch.Tensor,
    k: int,
    *,
    method: SvdMethod = "auto",
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    niter: int = NITER,
    seed: int = 0,
) -> TopK:
    """Top-k singular triplets of a (b, m, n) stack by the exact or randomized method (``auto``: see choose_method)."""
    a = as_stack(stack)
    m, n = a.shape[-2:]
    chosen = choose_method(m, n, k, method, oversample)
    if chosen == "randomized":
        return randomized_topk(a, k, dtype=dtype, oversample=oversample, niter=niter, seed=seed)
    return exact_topk(a, k, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# One decomposition for every consumer (the engine's shared SVD, docs/architecture.md)

_EXACTNESS = {"randomized": 0, "auto": 1, "exact": 2}


@dataclass(frozen=True)
class Need:
    """What one consumer needs of a matrix's SVD: every singular value (``values``), the top ``left`` left and
    ``right`` right singular vectors, at least ``dtype`` precision, by ``method`` where only top vectors are needed.

    Needs merge (:meth:`merge`): the union of what was asked, the widest dtype, the most exact method; one
    :func:`decompose` of the merged need serves every consumer (:meth:`Decomposition.view`).
    """

    values: bool = False
    left: int = 0
    right: int = 0
    dtype: torch.dtype = torch.float32
    method: SvdMethod = "exact"

    def merge(self, other: Need) -> Need:
        """The least need that covers both."""
        return Need(
            self.values or other.values,
            max(self.left, other.left),
            max(self.right, other.right),
            max(self.dtype, other.dtype, key=lambda d: torch.empty((), dtype=d).element_size()),
            max(self.method, other.method, key=_EXACTNESS.__getitem__),
        )

    def covers(self, other: Need) -> bool:
        """Whether a decomposition made for this need serves ``other``."""
        return self.merge(other) == self


@dataclass(frozen=True)
class Decomposition:
    """A (b, m, n) stack's SVD as one :func:`decompose` made it: ``s`` (b, p) every value when ``values`` was
    asked, else (b, t) the top t; ``u`` (b, m, left), ``v`` (b, n, right); ``methods`` per matrix, the CSV label
    ('exact', 'randomized(...)', or for the guarded fast path 'checked(...)' and 'exact (fallback)')."""

    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    methods: tuple[str, ...]
    need: Need

    def view(self, need: Need) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, u, v) as ``need`` asked: its counts of vectors, every value or the top ones, in its dtype."""
        if not self.need.covers(need):
            raise ValueError(f"a decomposition made for {self.need} cannot serve {need}")
        t = max(need.left, need.right, 1)
        s = self.s if need.values else self.s[..., :t]
        out = (s, self.u[..., : need.left], self.v[..., : need.right])
        return tuple(x.to(need.dtype) for x in out)  # type: ignore[return-value]


# The guarded fast path's acceptance test: the Wedin residual bound on sin of the largest angle between the
# computed and the exact top-k singular subspaces (both sides) must not exceed FAST_SIN_TOL, so every principal angle
# between two checked subspaces is within 2 * asin(1e-8) rad = 1.2e-6 degrees of the exact one. Subspace iteration
# runs NITER power steps, then FAST_STEP more at a time until every matrix of the batch passes or FAST_MAX_NITER
# steps were spent; a matrix still failing is decomposed exactly (see docs/metrics.md, spectral --svd).
FAST_SIN_TOL = 1e-8
# Under ``auto``, the guarded path is taken only from this min(m, n) up: it computes svdvals (every value) and then
# the top vectors, and svdvals alone is a large share of one full SVD. Measured on a quiet 2-core CPU, fp64, k = 64,
# whole pair, base side exact in both (BENCHMARKS.md §14): 0.72x the exact route's speed at 1024 (slower),
# 0.89-1.01x at 2048, 1.21x at 3072, 1.29-1.50x at 4096. Where it does not clearly pay, exact wins the tie.
FAST_VALUES_MIN_DIM = 3072
FAST_STEP = 4
FAST_MAX_NITER = 18


def checked_topk(
    a: torch.Tensor,
    k: int,
    values: torch.Tensor,
    *,
    seed: int = 0,
    tol: float = FAST_SIN_TOL,
    max_niter: int = FAST_MAX_NITER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
    """Top-k vectors of a (b, m, n) stack by randomized subspace iteration with a Rayleigh-Ritz step in a's dtype
    (use fp64), each matrix checked against its exact spectrum ``values`` (b, p).

    Returns u (b, m, k), v (b, n, k), the Wedin bound (b,) and ok (b,). For approximate triplets (Ũ, S̃, Ṽ) with
    residuals R = A Ṽ − Ũ S̃ and S = Aᵀ Ũ − Ṽ S̃, Wedin's theorem bounds sin of the largest principal angle between
    (Ũ, Ṽ) and the exact top-k pair by sqrt(‖R‖_F² + ‖S‖_F²) / δ, δ = s̃_k − σ_{k+1} (σ from ``values``; when
    δ <= 0 there is no bound and the matrix fails). A matrix is ok when its bound is at most ``tol``. The iteration
    (Halko et al. 2009, Alg. 4.4: q = k + oversample_for(k) columns, QR after every product) continues while some
    matrix fails, up to ``max_niter`` power steps.
    """
    m, n = a.shape[-2:]
    p = min(m, n)
    q = min(k + oversample_for(k), p)
    x = a if m >= n else a.mT  # (b, M, N), M >= N
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        r = torch.randn(x.shape[-1], q, dtype=x.dtype, device=x.device)  # (N, q)
    with _serial_lapack(x.device):
        basis = torch.linalg.qr(x @ r).Q  # (b, M, q)
    done, step = 0, NITER
    while True:
        for _ in range(step):
            with _serial_lapack(x.device):
                basis = torch.linalg.qr(x @ torch.linalg.qr(x.mT @ basis).Q).Q
        done += step
        with _serial_lapack(x.device):
            ub, s, vh = torch.linalg.svd(basis.mT @ x, full_matrices=False)  # Rayleigh-Ritz: Qᵀ A = U_B S V_Bᵀ
        lu, s, lv = basis @ ub[..., :k], s[..., :k], vh[..., :k, :].mT  # (b, M, k), (b, k), (b, N, k)
        res = (x @ lv - lu * s.unsqueeze(-2)).square().sum((-2, -1))
        res = (res + (x.mT @ lu - lv * s.unsqueeze(-2)).square().sum((-2, -1))).sqrt()  # (b,)
        delta = s[:, k - 1] - values[:, k] if k < p else torch.full_like(res, math.inf)
        bound = torch.where(delta > 0, res / delta.clamp_min(torch.finfo(x.dtype).tiny), math.inf)
        ok = (bound <= tol).tolist()
        if all(ok) or done >= max_niter:
            break
        step = min(FAST_STEP, max_niter - done)
    u, v = (lu, lv) if m >= n else (lv, lu)
    return u.contiguous(), v.contiguous(), bound, ok


def likely_to_converge(values: torch.Tensor, k: int, q: int, tol: float = FAST_SIN_TOL) -> list[bool]:
    """Per matrix, from its exact spectrum (b, p): whether subspace iteration with q columns is expected to pass
    :func:`checked_topk`'s check within FAST_MAX_NITER steps.

    Each power step shrinks the residual of the top-k Ritz pairs by about ρ = (σ_{q+1} / σ_k)², down to the
    rounding floor 10 ε √p σ_1; the prediction (σ_{q+1} ρ^FAST_MAX_NITER + floor) / (σ_k − σ_{k+1}) <= tol decides
    whether to try (a flat spectrum, where the try would
    only add its cost to the exact SVD, goes to the exact route at once). It only picks the route: the check after
    the iteration is what accepts a result.
    """
    p = values.shape[-1]
    if k >= p:
        return [False] * values.shape[0]
    sk, sk1 = values[:, k - 1], values[:, k]
    sq1 = values[:, q] if q < p else torch.zeros_like(sk)
    rho = (sq1 / sk.clamp_min(torch.finfo(values.dtype).tiny)).square()
    floor = 10 * torch.finfo(values.dtype).eps * math.sqrt(p) * values[:, 0]  # rounding: no residual goes below it
    predicted = (sq1 * rho.pow(FAST_MAX_NITER) + floor) / (sk - sk1).clamp_min(torch.finfo(values.dtype).tiny)
    return ((predicted <= tol) & (sk > sk1)).tolist()


def decompose(stack: torch.Tensor, need: Need, hint: torch.Tensor | None = None) -> Decomposition:
    """The one SVD of a (b, m, n) stack that ``need`` (merged over every consumer) asks for.

    Every value asked: ``svdvals`` when no vector is. With top vectors too: by ``need.method``, exact is one full
    SVD with the top vectors kept (:func:`spectrum_topk`); ``auto`` on a matrix large enough for randomized
    (:func:`choose_method`, and min(m, n) >= FAST_VALUES_MIN_DIM) is the guarded fast path: for the matrices
    whose spectrum predicts convergence (:func:`likely_to_converge`), ``svdvals`` for every value and
    :func:`checked_topk` for the top vectors; the exact route for the others and for each matrix whose check
    fails. ``hint`` (b, p): the spectra of nearby matrices (the base's, for a fine-tune), which decide the route
    before any work; without it ``svdvals`` is computed first and the matrix's own spectrum decides. Only top
    vectors: :func:`topk` by ``need.method``.
    """
    a = as_stack(stack)
    b, m, n = a.shape
    p = min(m, n)
    left, right = min(need.left, p), min(need.right, p)
    if need.values and left == right == 0:
        s = svdvals(a, need.dtype)
        u0, v0 = s.new_zeros(b, m, 0), s.new_zeros(b, n, 0)
        return Decomposition(s, u0, v0, ("exact",) * b, need)
    t = max(left, right, 1)
    if need.values:
        sketch_all = t + oversample_for(t) >= p  # the sketch would span the whole space: nothing to save
        small = need.method == "auto" and p < FAST_VALUES_MIN_DIM  # exact is as fast or faster there (see above)
        if need.method == "exact" or choose_method(m, n, t, need.method) == "exact" or sketch_all or small:
            s, u, v = spectrum_topk(a, max(right, 1), need.dtype, k_left=max(left, 1))
            return Decomposition(s, u, v, ("exact",) * b, need)
        x = upcast(a, need.dtype)
        q = min(t + oversample_for(t), p)
        s = x.new_zeros(b, p)
        u, v = x.new_zeros(b, m, t), x.new_zeros(b, n, t)
        labels = ["exact (gap)"] * b  # predicted not to converge: decomposed exactly without trying
        hopeful = likely_to_converge(hint, t, q) if hint is not None else [True] * b
        tried = [i for i, good in enumerate(hopeful) if good]
        if tried:
            idx = torch.tensor(tried, device=x.device)
            xt = x if len(tried) == b else x.index_select(0, idx)
            st = svdvals(xt, need.dtype)
            s[idx] = st
            go = likely_to_converge(st, t, q)  # its own spectrum has the last word
            keep = [j for j, good in enumerate(go) if good]
            if keep:
                kidx = torch.tensor(keep, device=x.device)
                whole = len(keep) == len(tried)
                ut, vt, _, ok = checked_topk(xt if whole else xt.index_select(0, kidx), t, st if whole else st[kidx])
                rows = idx[kidx]
                u[rows], v[rows] = ut, vt
                for j, good in zip(keep, ok, strict=True):
                    labels[tried[j]] = f"checked(q={q},seed=0)" if good else "exact (fallback)"
        redo = [i for i, label in enumerate(labels) if label.startswith("exact")]
        if redo:
            idx = torch.tensor(redo, device=x.device)
            se, ue, ve = spectrum_topk(x.index_select(0, idx), t, need.dtype)
            s[idx], u[idx], v[idx] = se, ue, ve  # exactly what --svd exact gives for these matrices
        return Decomposition(s, u[..., :left], v[..., :right], tuple(labels), need)
    top = topk(a, t, method=need.method, dtype=need.dtype)
    return Decomposition(top.s, top.u, top.v, (top.describe(),) * b, need)


def _check_k(k: int, p: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, p)


# ---------------------------------------------------------------------------------------------
# Memory planning


def workspace_bytes(
    shape: tuple[int, int],
    in_dtype: torch.dtype,
    dtype: torch.dtype = torch.float32,
    *,
    work: Work = "svd",
    k: int = 64,
    oversample: int | None = None,
    device_type: str = "cpu",
) -> int:
    """Estimated peak bytes for ONE (m, n) matrix of a batched call; a batch of b costs b times this.

    With p = min(m, n), x = max(m, n), e = bytes per element of ``dtype``, e_in of ``in_dtype``:

    - stacked input in its storage dtype: e_in * m n
    - upcast copy, when ``in_dtype != dtype``: e * m n
    - LAPACK's column-major working copy (torch always clones the input for gesdd): e * m n
    - ``svd`` (gesdd, JOBZ='S'): outputs U, S, Vh = e * (m p + p + p n); workspace
      LWORK = 4 p^2 + 7 p + (m + n) nb (minimum 4p^2+7p plus the blocked bidiagonalisation), IWORK = 8 p int32
    - ``svdvals`` (gesdd, JOBZ='N'): S = e * p; LWORK = 3 p + max(x, 7 p) + (m + n) nb; IWORK = 8 p int32
    - ``randomized`` (svd_lowrank, q = k + oversample): sketches A R, Q, A^H Q and B = Q^H A plus the small SVD of B:
      e * (3 (m + n) q + 6 q^2 + q n); no LAPACK copy of A (only matmuls touch it)

    cuSOLVER's gesvdj / gesvd buffers are of the same order (a copy of A plus O(p^2 + (m + n) p)), so the same
    formula is used on GPUs, except that ``svdvals`` on CUDA is counted as a full ``svd``: measured on an H100
    (torch 2.11), svdvals peaked above the JOBZ='N' estimate, close to the vectors case. It deliberately
    over-counts rather than under-counts (bench_svd.py prints measured peak beside it).
    """
    if work == "svdvals" and device_type == "cuda":
        work = "svd"
    m, n = shape
    p, x = min(m, n), max(m, n)
    e = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    e_in = torch.empty((), dtype=in_dtype).element_size()
    mn = m * n
    total = e_in * mn + (e * mn if in_dtype != dtype else 0)
    nb = _LAPACK_NB
    if work == "svd":
        total += e * mn + e * (m * p + p + p * n) + e * (4 * p * p + 7 * p + (m + n) * nb) + 4 * 8 * p
    elif work == "svdvals":
        total += e * mn + e * p + e * (3 * p + max(x, 7 * p) + (m + n) * nb) + 4 * 8 * p
    elif work == "randomized":
        q = min(p, k + (oversample_for(k) if oversample is None else oversample))
        total += e * (3 * (m + n) * q + 6 * q * q + q * n)
    else:
        raise ValueError(f"unknown work kind {work!r}")
    return total


def batch_size(
    shape: tuple[int, int],
    in_dtype: torch.dtype,
    budget_bytes: int,
    dtype: torch.dtype = torch.float32,
    *,
    work: Work = "svd",
    k: int = 64,
    oversample: int | None = None,
    count: int | None = None,
    device_type: str = "cpu",
) -> int:
    """How many same-shape matrices to stack per batched call so b * workspace_bytes(...) <= budget_bytes.

    Always >= 1 (a single matrix is computed even when it alone exceeds the budget) and at most ``count`` if given.
    """
    per = workspace_bytes(shape, in_dtype, dtype, work=work, k=k, oversample=oversample, device_type=device_type)
    b = max(1, budget_bytes // per)
    return int(min(b, count)) if count is not None else int(b)
