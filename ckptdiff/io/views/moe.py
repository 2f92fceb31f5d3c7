"""Fused mixture-of-experts tensors, split into one tensor per expert.

Some checkpoints store all experts of a layer in one tensor with a leading expert dimension:
``mlp.experts.gate_up_proj`` of shape (E, d, 2f) and ``mlp.experts.down_proj`` (E, f, d) in gpt-oss and Llama 4,
``mlp.experts.gate_up_proj_bias`` (E, 2f). :func:`split` presents each such tensor as E tensors named
``NAME[e]`` (``mlp.experts.gate_up_proj[3]``), each the contiguous slice ``NAME[e]`` of the stored tensor, so every
analysis, rollup and the ``expert`` column see experts whatever the storage: a fused (E, d, 2f) tensor gives E
matrices for the SVD-based analyses instead of one 3-D tensor they would skip.

A tensor is taken for fused when its name ends in ``experts.PART`` (optionally ``.weight``/``.bias``) with a PART
that is not an expert index, and it has at least two dimensions. Reading ``NAME[e]`` reads only that slice.

The view never replaces a stored tensor and its cost follows the bytes present:

- Tensor names are arbitrary strings in safetensors and in ``.bin`` state dicts, so no spelling is reserved for
  the slices: a checkpoint that stores a tensor (or a tied name) under a name a slice would take is refused,
  naming both. Renaming the slice only there would make its name depend on the other tensors, and the same
  expert would get different names in two checkpoints.
- More than :data:`MAX_EXPERTS` experts in one tensor, or :data:`MAX_SLICES` slices in one checkpoint, is refused
  in one line before any slice is made: a 100-byte header must not cost minutes. A fused tensor whose experts are
  empty (a zero in its other dimensions) holds no bytes to split and is left whole; every other slice holds at
  least one stored entry, so the slices made never outnumber the bytes present.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np
import torch

from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views.fp8 import Fp8Info

_FUSED = re.compile(r"(?:^|\.)experts\.[A-Za-z_]\w*(?:\.(?:weight|bias))?$")
# Bounds on the split, far above released models (2,048 experts at most, Switch-C; 18,432 slices, gpt-oss-120b).
# Each slice is a row of every report and each expert a group of the per-expert rollups: the worst header they
# accept (4 x 16,384 one-entry experts, 128 KB of data) took 49 s of `sparsity` on a loaded 2-core machine, the
# cost of a plain checkpoint with as many tensors.
MAX_EXPERTS = 1 << 14  # experts in one fused tensor
MAX_SLICES = 1 << 16  # per-expert tensors in one checkpoint


def is_fused(info: TensorInfo) -> bool:
    """Whether a stored tensor holds every expert of a layer along its first dimension."""
    if isinstance(info, Fp8Info) and info.scaled:  # a dequantized FP8 weight is a matrix, never a stack
        return False
    return len(info.shape) >= 2 and info.shape[0] > 0 and bool(_FUSED.search(info.name))


def slice_name(name: str, expert: int) -> str:
    """The name of expert ``expert``'s slice of fused tensor ``name``: ``name[expert]``."""
    return f"{name}[{expert}]"


def _where(src: Source, info: TensorInfo) -> str:
    """The file holding ``info`` (the shard), else what the user typed, for messages."""
    return info.file or src.spec


def _to_split(src: Source) -> Iterator[TensorInfo]:
    """The fused tensors of ``src`` worth splitting (their experts hold entries), after the bounds above.

    InputError, naming the file and tensor, for an absurd expert count or too many slices in all.
    """
    total = 0
    for info in src.infos.values():
        if not is_fused(info):
            continue
        experts = info.shape[0]
        if experts > MAX_EXPERTS:  # even when empty: no such model exists, the header is wrong
            raise InputError(
                f"{_where(src, info)}: fused expert tensor {info.name!r} declares {experts:,} experts (shape "
                f"{list(info.shape)}), more than the {MAX_EXPERTS:,} ckptdiff splits; the header is corrupt or "
                "hostile: re-save the checkpoint"
            )
        if math.prod(info.shape[1:]) == 0:
            continue
        total += experts
        if total > MAX_SLICES:
            raise InputError(
                f"{_where(src, info)}: fused expert tensors up to {info.name!r} split into more than "
                f"{MAX_SLICES:,} per-expert tensors; the header is corrupt or hostile: re-save the checkpoint"
            )
        yield info


def _collision(src: Source, fused: TensorInfo, expert: int, stored: str) -> InputError:
    """The error for a stored (or tied) name that is the name expert ``expert``'s slice of ``fused`` would take."""
    return InputError(
        f"{_where(src, fused)}: tensor {stored!r} is stored under the name ckptdiff gives expert {expert} of the "
        f"fused expert tensor {fused.name!r}, so one would hide the other; rename or remove {stored!r}"
    )


class SplitExpertsSource(Source):
    """A source whose fused expert tensors read as one tensor per expert; everything else passes through."""

    def __init__(self, inner: Source):
        split = {info.name for info in _to_split(inner)}
        infos: dict[str, TensorInfo] = {}
        self.parts: dict[str, tuple[str, int]] = {}  # slice name -> (stored name, first flat entry)
        for name, info in inner.infos.items():
            if name not in split:
                infos[name] = info
                continue
            shape = tuple(info.shape[1:])
            per = math.prod(shape)
            for e in range(info.shape[0]):
                sub = slice_name(name, e)
                if sub in inner.infos or sub in inner.tied:
                    raise _collision(inner, info, e, sub)
                infos[sub] = dataclasses.replace(info, name=sub, shape=shape)  # keeps an FP8 note
                self.parts[sub] = (name, e * per)
        fused = len(split)
        what = f"moe: {fused} fused expert tensors split into {len(self.parts)} per-expert tensors"
        super().__init__(inner.spec, f"{inner.resolved} [{what}]", infos, dict(inner.tied))
        self.inner = inner

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        part = self.parts.get(name)
        if part is None:
            return self.inner.read(name, start, count, out)
        stored, first = part
        n = self.infos[name].numel - start if count is None else count
        return self.inner.read(stored, first + start, n, out)

    def close(self) -> None:
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()


def split(src: Source) -> Source:
    """``src`` with its fused expert tensors split per expert, or ``src`` itself when it has none worth splitting."""
    if isinstance(src, SplitExpertsSource) or not any(True for _ in _to_split(src)):
        return src
    return SplitExpertsSource(src)
