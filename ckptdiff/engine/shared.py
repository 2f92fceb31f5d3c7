"""One decomposition per (matrix, side) per run, shared by every analysis that needs it.

Principal-overlap's rank-k mask, spectral's NSS, singular-value changes and angles, intruder dimensions and the
``check`` rules on any of them all start from an SVD of the same base (and fine-tune) matrices. Each analysis
declares what it needs of a matrix (:meth:`ckptdiff.engine.pipeline.Analysis.svd_requests`: which side, rounded to
which dtype, and a :class:`~ckptdiff.metrics.linalg.Need`: every singular value or not, how many top vectors, at
what precision, by which method); for each batch the pipeline merges the requests per (side, rounding) into the
least need that covers them all, and a :class:`SharedSVD` computes each merged need once, on first use, over the
matrices of that side that are finite. Every analysis then takes its view (its own counts of vectors, its own
dtype: a decomposition made at fp64 for spectral is handed to principal-overlap rounded to fp32).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ckptdiff import dtypes
from ckptdiff.metrics import linalg
from ckptdiff.metrics.linalg import Decomposition, Need
from ckptdiff.metrics.mask import widen_fp8


@dataclass(frozen=True)
class SvdRequest:
    """What one analysis needs of one side's matrices in a batch.

    ``side``: an index into the run's sources; ``rounding``: the storage dtype each matrix is rounded to before it
    is decomposed (None: as stored, fp8 widened exactly); ``need``: what of the SVD.
    """

    side: int
    need: Need
    rounding: torch.dtype | None = None


Key = tuple[int, torch.dtype | None]


class SharedSVD:
    """The decompositions of one batch's (b, m, n) stacks, each computed once for every analysis that asks.

    Built by the pipeline from the stacks it read (by run side) and every request the batch's analyses declared;
    analyses call :meth:`finite` and :meth:`get`. A request that was not declared is a programming error.
    """

    def __init__(self, stacks: Mapping[int, torch.Tensor], requests: Iterable[SvdRequest]) -> None:
        self.stacks = stacks
        self.needs: dict[Key, Need] = {}
        for r in requests:
            key = self._key(r.side, r.rounding)
            self.needs[key] = self.needs[key].merge(r.need) if key in self.needs else r.need
        self._finite: dict[Key, list[bool]] = {}
        self._done: dict[Key, tuple[list[int], Decomposition | None]] = {}

    def _key(self, side: int, rounding: torch.dtype | None) -> Key:
        raw = self.stacks[side].dtype
        stored = widen_fp8(self.stacks[side][:0]).dtype  # the dtype the matrices arrive in (fp8 widened)
        if rounding is None or rounding in (raw, stored) or (stored, rounding) in dtypes.WIDENS_EXACTLY:
            return (side, None)  # rounding changes nothing: the same matrices
        return (side, rounding)

    def _matrices(self, key: Key) -> torch.Tensor:
        side, rounding = key
        x = widen_fp8(self.stacks[side])
        return widen_fp8(x.to(rounding)) if rounding is not None else x  # rounded to fp8: its values, widened

    def finite(self, side: int, rounding: torch.dtype | None = None) -> list[bool]:
        """Per matrix of the batch: whether every entry of this side, rounded as asked, is finite."""
        key = self._key(side, rounding)
        if key not in self._finite:
            self._finite[key] = linalg.finite_rows(self._matrices(key))
        return self._finite[key]

    def _hint(self, key: Key, keep: list[int]) -> torch.Tensor | None:
        """The full spectra another side of this batch already has for the same matrices (the base's, when the
        fine-tune is decomposed): they pick the fine-tune's route before any work (see linalg.decompose)."""
        for other, (rows, dec) in self._done.items():
            if other != key and dec is not None and dec.need.values and rows == keep:
                return dec.s
        return None

    def get(
        self, side: int, need: Need, rows: Sequence[int], rounding: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """(s, u, v, method label per row) of the batch's matrices ``rows`` (finite ones) as ``need`` asks.

        The merged need of (side, rounding) is decomposed once, over every finite matrix of the side, the first
        time anyone asks; later calls take views of it.
        """
        key = self._key(side, rounding)
        merged = self.needs.get(key)
        if merged is None or not merged.covers(need):
            raise ValueError(f"an SVD of side {side} ({need}) was asked for but not declared in svd_requests")
        if key not in self._done:
            finite = self.finite(side, rounding)
            keep = [i for i, ok in enumerate(finite) if ok]
            dec = None
            if keep:
                x = self._matrices(key).to(merged.dtype)
                if len(keep) < len(finite):
                    x = x.index_select(0, torch.tensor(keep, device=x.device))
                dec = linalg.decompose(x, merged, self._hint(key, keep))
            self._done[key] = (keep, dec)
        keep, dec = self._done[key]
        where = {row: j for j, row in enumerate(keep)}
        missing = [i for i in rows if i not in where]
        if missing or dec is None:
            raise ValueError(f"matrices {missing} of side {side} are not finite: no SVD")
        s, u, v = dec.view(need)
        pos = [where[i] for i in rows]
        if pos != list(range(len(keep))):
            idx = torch.tensor(pos, device=s.device)
            s, u, v = (t.index_select(0, idx) for t in (s, u, v))
        return s, u, v, [dec.methods[j] for j in pos]
