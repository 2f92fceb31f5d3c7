"""A checkpoint as the rest of ckptdiff sees it: a lazy, named collection of tensors.

A :class:`Source` knows every tensor's name, dtype and shape from headers alone, and reads one tensor, or one flat
range of a tensor, on demand. Nothing is loaded up front, so memory does not grow with model size. Each file format
has its source in :mod:`ckptdiff.io.formats`; :mod:`ckptdiff.io.resolve` turns what a user typed into one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptdiff.dtypes import DType
from ckptdiff.errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str = ""  # the shard it lives in (for messages)

    @property
    def numel(self) -> int:
        """Number of entries."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Tie:
    """A name that holds no data of its own in a checkpoint: it is tensor ``to`` (see :mod:`ckptdiff.io.views.ties`)."""

    to: str  # the tensor it is, kept in ``Source.infos``
    why: str  # how it is known: "shared storage", "config.json tie_word_embeddings"


SHARED_STORAGE = "shared storage"


@dataclass
class Source(ABC):
    """A lazy checkpoint: tensor metadata up front, data on demand.

    ``infos`` holds each tensor once: a name that is another tensor (a tied output embedding) is not in it but in
    ``tied``, so totals count its data once and alignment compares it under the name kept.
    """

    spec: str  # what the user typed
    resolved: str  # what it resolved to (paths, hub revision)
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    tied: dict[str, Tie] = field(default_factory=dict)  # alias name -> the tensor it is
    # True once this is the form the analyses compare: :func:`ckptdiff.io.resolve.logical` applied, or the stored
    # form asked for on purpose (``open(..., stored=True)``); a source not yet viewed is viewed when it is opened.
    viewed: bool = field(default=False, kw_only=True)

    @abstractmethod
    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        """Entries [start, start+count) of tensor ``name``, flattened, on the CPU, in its stored dtype.

        ``out``, a uint8 buffer large enough for the bytes, is filled and viewed instead of allocating:
        reusing buffers avoids the page faults of fresh memory, which cost more than the read itself.
        Sources that must gather a non-contiguous view allocate instead.
        """

    def derived_from(self, name: str) -> Source | None:
        """The source whose same-named tensor this tensor is computed from (None: read it with :meth:`read`).

        A view over another checkpoint (a PEFT adapter merged into its base, :mod:`ckptdiff.io.views.lora`) says so
        here; a reader that reads that source in the same pass hands its entries to :meth:`derive` instead of
        reading the same bytes again.
        """
        return None

    def derive(self, name: str, given: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Entries [start, start+count) of ``name``, flattened, from ``given``: the same entries of the tensor of
        :meth:`derived_from` (flattened). Only called for a name :meth:`derived_from` names a source for."""
        raise NotImplementedError(f"{type(self).__name__} derives no tensor")

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in its stored shape."""
        return self.read(name).reshape(self.infos[name].shape)

    def _check_index(self, expected: dict[str, str] | None) -> None:
        """Every tensor an index's weight map names is held by the shards (as itself or as a tie)."""
        for name, shard in (expected or {}).items():
            if name not in self.infos and name not in self.tied:
                raise InputError(
                    f"index for {self.spec} says tensor {name!r} is in {shard}, but that shard does not hold it; "
                    "the checkpoint is incomplete: re-download it"
                )

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release file handles."""

    def abandon_reads(self) -> None:  # noqa: B027 - a local file's reads end soon on their own
        """Make the reads in progress in other threads end at once with an error, not when the bytes come (a run
        that is stopping, on Ctrl-C, must not wait for a stalled network read); later reads are unaffected."""

    def remote_config(self) -> tuple[str, bytes] | None:
        """The checkpoint's ``config.json`` as (where, bytes) when its files are not on this machine (a streamed
        Hub repo fetches it); None for a local checkpoint, whose config sits beside the weights
        (:mod:`ckptdiff.io.views.config` looks there)."""
        return None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(i.nbytes for i in self.infos.values())
