"""One decomposition per (matrix, side) per run, whatever mix of analyses asks (engine/shared.py, issue 26 item 1).

A counting shim wraps every SVD entry point of ckptdiff.metrics.linalg (and the name metrics.spectral imports)
and fingerprints each matrix it is handed; every base and fine-tune matrix must be decomposed exactly once per
run, and the results equal the single commands'.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from factory import llama_like, save_single

from ckptdiff.analyses.principal import PrincipalAnalysis, principal_overlap
from ckptdiff.analyses.sparsity import SparsityAnalysis
from ckptdiff.analyses.spectral import SpectralAnalysis, spectral
from ckptdiff.engine.pipeline import run_analyses
from ckptdiff.engine.shared import SharedSVD, SvdRequest
from ckptdiff.gate.check import check
from ckptdiff.metrics import linalg
from ckptdiff.metrics import spectral as S

ENTRY_POINTS = ("svd", "svdvals", "spectrum_topk", "exact_topk", "randomized_topk", "decompose")


def _fingerprint(m: torch.Tensor) -> str:
    return hashlib.sha1(m.detach().to(torch.float64).contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Matrix fingerprint -> how many outermost SVD calls were handed it."""
    seen: Counter[str] = Counter()
    depth = [0]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def counting(stack: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                for m in linalg.as_stack(stack):
                    seen[_fingerprint(m)] += 1
            depth[0] += 1
            try:
                return fn(stack, *args, **kwargs)
            finally:
                depth[0] -= 1

        return counting

    for name in ENTRY_POINTS:
        monkeypatch.setattr(linalg, name, wrap(getattr(linalg, name)))
    monkeypatch.setattr(S, "spectrum_topk", wrap(S.spectrum_topk))  # the null's decompositions go through here
    yield seen


def _checkpoints(tmp_path: Path, fts: int) -> tuple[Path, list[Path], dict[str, list[torch.Tensor]]]:
    """A bf16 base and ``fts`` fine-tunes whose every matrix differs from every other (so fingerprints are unique)."""
    base = llama_like(layers=1, d=16, ff=24, vocab=20, seed=0)
    paths, mats = [], {name: [t] for name, t in base.items() if t.dim() == 2}
    for r in range(fts):
        g = torch.Generator().manual_seed(100 + r)
        ft = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        paths.append(save_single(ft, tmp_path / f"ft{r}.safetensors"))
        for name in mats:
            mats[name].append(ft[name])
    return save_single(base, tmp_path / "base.safetensors"), paths, mats


def _decomposed(seen: Counter[str], mats: dict[str, list[torch.Tensor]], side: int) -> dict[str, int]:
    return {name: seen[_fingerprint(ts[side])] for name, ts in mats.items()}


def test_report_mix_decomposes_each_matrix_once_per_side(tmp_path: Path, counted: Counter[str]) -> None:
    base, (ft,), mats = _checkpoints(tmp_path, 1)
    analyses = [
        SparsityAnalysis(),
        PrincipalAnalysis(k=4, svd="exact"),
        SpectralAnalysis(k=4, null="random"),  # the null adds its own W0 + R decompositions, not W0's
    ]
    _, pr, sp = run_analyses([str(base), str(ft)], analyses, labels=["base", "ft"], progress=False)
    assert _decomposed(counted, mats, 0) == dict.fromkeys(mats, 1)  # the base: once, for principal and spectral
    assert _decomposed(counted, mats, 1) == dict.fromkeys(mats, 1)  # the fine-tune: once, for spectral
    # The same figures as the single commands: spectral bit for bit (same need), principal's vectors came from the
    # fp64 decomposition spectral needed, rounded to its fp32, so its figures agree to fp32 rounding.
    pd.testing.assert_frame_equal(
        sp.to_frame(), spectral(str(base), str(ft), k=4, null="random", progress=False).to_frame()
    )
    single = principal_overlap(str(base), str(ft), k=4, svd="exact", progress=False).to_frame()
    pd.testing.assert_frame_equal(pr.to_frame(), single, rtol=1e-5)


def test_several_fine_tunes_share_the_base_decomposition(tmp_path: Path, counted: Counter[str]) -> None:
    base, fts, mats = _checkpoints(tmp_path, 2)
    analyses = [
        PrincipalAnalysis(k=3, sides=(0, 1)),
        SpectralAnalysis(k=5, sides=(0, 1)),
        PrincipalAnalysis(k=6, sides=(0, 2)),
        SpectralAnalysis(k=2, sides=(0, 2)),
    ]
    results = run_analyses([str(base), *map(str, fts)], analyses, labels=["base", "a", "b"], progress=False)
    for side in (0, 1, 2):
        assert _decomposed(counted, mats, side) == dict.fromkeys(mats, 1), side
    # Each analysis saw its own k, as the single command would give it.
    assert set(results[0].to_frame()["k"].dropna()) == {3}
    assert set(results[1].to_frame()["k"].dropna()) == {5}
    pd.testing.assert_frame_equal(
        results[3].to_frame(), spectral(str(base), str(fts[1]), k=2, progress=False).to_frame()
    )


def test_check_with_rules_of_two_analyses_decomposes_once(tmp_path: Path, counted: Counter[str]) -> None:
    base, (ft,), mats = _checkpoints(tmp_path, 1)
    rules = ["ratio_principal < 100", "nss@*q_proj* < 10", "sparsity >= 0"]
    result = check(str(base), str(ft), rules=rules, k=4, progress=False)
    assert result.passed
    assert _decomposed(counted, mats, 0) == dict.fromkeys(mats, 1)
    assert _decomposed(counted, mats, 1) == dict.fromkeys(mats, 1)


def test_single_principal_decomposes_only_the_base(tmp_path: Path, counted: Counter[str]) -> None:
    base, (ft,), mats = _checkpoints(tmp_path, 1)
    principal_overlap(str(base), str(ft), k=4, progress=False)
    assert _decomposed(counted, mats, 0) == dict.fromkeys(mats, 1)
    assert _decomposed(counted, mats, 1) == dict.fromkeys(mats, 0)


def test_shared_views_are_the_merged_decomposition_cut_to_each_need() -> None:
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 12, 7, generator=g, dtype=torch.float64)
    stack[1, 2, 3] = float("nan")
    small = linalg.Need(left=2, right=2, dtype=torch.float32)
    full = linalg.Need(values=True, left=4, right=3, dtype=torch.float64)
    shared = SharedSVD({0: stack}, [SvdRequest(0, small), SvdRequest(0, full)])
    assert shared.finite(0) == [True, False, True]
    s, u, _, labels = shared.get(0, small, [2])
    u_ref, s_ref, _ = torch.linalg.svd(stack[2])  # independent: the plain LAPACK SVD of that matrix
    assert labels == ["exact"] and s.dtype == torch.float32 and s.shape == (1, 2) and u.shape == (1, 12, 2)
    torch.testing.assert_close(s[0].double(), s_ref[:2], rtol=1e-6, atol=0)
    # Same subspace (signs may differ): |u_i . u_ref_i| = 1.
    torch.testing.assert_close((u[0].double() * u_ref[:, :2]).sum(0).abs(), torch.ones(2, dtype=torch.float64))
    s_all, u4, v3, _ = shared.get(0, full, [0, 2])
    assert s_all.shape == (2, 7) and u4.shape == (2, 12, 4) and v3.shape == (2, 7, 3)
    torch.testing.assert_close(s_all[1], s_ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="not declared"):
        shared.get(0, linalg.Need(left=5), [0])
    with pytest.raises(ValueError, match="not finite"):
        shared.get(0, small, [1])
