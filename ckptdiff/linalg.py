"""SVD machinery shared by the principal-weight (docs/metrics.md §2) and spectral (§3) analyses.

Exact batched SVD / svdvals, randomized top-k (``torch.svd_lowrank``), the computation dtype rule
(fp32 or fp64, never bf16: inputs are upcast), a memory-budget batch planner and the ``auto`` method rule.
Everything is device-agnostic: tensors stay on the device they arrive on, so the GPU path is the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["exact", "randomized", "auto"]
Work = Literal["svd", "svdvals", "randomized"]

COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# Randomized top-k defaults: q = k + max(OVERSAMPLE_MIN, ceil(OVERSAMPLE_FRAC * k)) columns, NITER power iterations.
# Chosen so the rank-k principal mask agrees with the exact one on >= 99% of entries for slowly decaying spectra
# (sigma_i ~ i^-0.5 plus noise, the hard case; see tests/test_linalg.py and benchmarks/bench_svd.py). Measured on
# 512x256, k=64: q=k+10, niter=2 gave 87%; q=2k, niter=4 99.2%; q=2k, niter=6 99.8%. On 7B shapes: 99.88-99.89%.
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


def svd(stack: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact economy SVD of a (b, m, n) stack in ``dtype``: U (b, m, p), S (b, p), Vh (b, p, n), p = min(m, n)."""
    u, s, vh = torch.linalg.svd(upcast(as_stack(stack), dtype), full_matrices=False)
    return u, s, vh


def svdvals(stack: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values (b, p) of a (b, m, n) stack in ``dtype``, descending."""
    return torch.linalg.svdvals(upcast(as_stack(stack), dtype))


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
    """Top-k triplets of a (b, m, n) stack by ``torch.svd_lowrank`` (Halko et al. 2009, Alg. 5.1).

    Sketches q = k + oversample columns with ``niter`` QR-stabilised power iterations; the global RNG is forked
    and seeded with ``seed`` so the call is repeatable and leaves the caller's RNG state alone.
    """
    a = upcast(as_stack(stack), dtype)
    p = min(a.shape[-2:])
    k = _check_k(k, p)
    over = oversample_for(k) if oversample is None else oversample
    q = min(k + over, p)
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=niter)
    return TopK(
        u[..., :k].contiguous(),
        s[..., :k].contiguous(),
        v[..., :k].contiguous(),
        "randomized",
        oversample=q - k,
        niter=niter,
        seed=seed,
    )


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
