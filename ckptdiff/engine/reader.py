"""The reader: aligned tensors from several checkpoints, a chunk or a whole tensor at a time, on a device.

This module is the one place that knows about reading order, prefetching and devices. The pipeline
(:mod:`ckptdiff.engine.pipeline`) asks it for the sides each tensor is needed from and gets them on the requested
device, one at a time, with a bounded prefetch: peak memory is set by the largest tensor (or the chunk
size), never by the model size. Sides nobody needs are not read (their slot holds ``None``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ckptdiff.engine.alignment import Aligned
from ckptdiff.errors import InputError, option
from ckptdiff.io.source import Source

CHUNK_BYTES = 16 * 1024 * 1024  # per side, for element-wise analyses

# ---------------------------------------------------------------------------------------------
# devices


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'."""
    spec = spec.strip().lower()
    flag = option("--device")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {spec} was asked for but no CUDA GPU is available; use {flag} cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise InputError(f"{flag} {spec} is not a valid device; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {spec}: only {torch.cuda.device_count()} GPU(s) visible; pick another index")
        return dev
    raise InputError(f"{flag} {spec} is not a valid device; use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------------
# reading with a bounded prefetch

T = TypeVar("T")
_DONE = object()


def prefetch(produce: Iterator[T], depth: int = 2, abandon: Callable[[], None] | None = None) -> Iterator[T]:
    """Run an iterator in a background thread, at most ``depth`` items ahead; re-raise its errors here.

    File reads release the GIL, so reading the next tensor overlaps with computing on this one. When the consumer
    stops first (an error, Ctrl-C), ``abandon()`` makes a read in progress end at once (a network read may stall)
    before the thread is waited for.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in produce:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=worker, name="ckptdiff-prefetch", daemon=True)
    thread.start()
    ended = False  # the worker has handed over its last item (or its error)
    try:
        while True:
            item = q.get()
            ended = item is _DONE or isinstance(item, BaseException)
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if abandon is not None and not ended:
            abandon()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@dataclass(frozen=True)
class Read:
    """One aligned tensor and the sides (indices into the sources) it must be read from."""

    item: Aligned
    sides: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes this read costs, all its sides together."""
        return sum(info.nbytes for k in self.sides if (info := self.item.infos[k]) is not None)


Tensors = tuple[torch.Tensor | None, ...]  # one slot per source; None for a side that was not read


@dataclass(frozen=True)
class Chunk:
    """A flat range [start, start+len) of one aligned tensor, read from the sides asked for."""

    item: Aligned
    start: int
    tensors: Tensors
    last: bool  # the final chunk of this tensor

    @property
    def nbytes(self) -> int:
        """Bytes read for this chunk, all sides together."""
        return _nbytes(self.tensors)


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _to(tensors: Tensors, device: torch.device | None) -> Tensors:
    if device is None or device.type == "cpu":
        return tensors
    return tuple(t.to(device) if t is not None else None for t in tensors)


def _chunk_elems(item: Aligned, chunk_bytes: int) -> int:
    widest = max(i.dtype.itemsize for i in item.infos if i is not None)
    return max(1, chunk_bytes // widest)


def _abandon(sources: Sequence[Source]) -> None:
    """Each source's reads in progress end at once (see :meth:`Source.abandon_reads`)."""
    for src in sources:
        src.abandon_reads()


def _read_sides(
    sources: Sequence[Source],
    read: Read,
    start: int = 0,
    count: int | None = None,
    outs: Sequence[np.ndarray] | None = None,
) -> Tensors:
    """Entries [start, start+count) of ``read.item`` from every side asked for (``count`` None: the whole tensor
    in its stored shape; ``outs``: one reusable buffer per side). A side whose tensor is derived from another
    side's same-named tensor (:meth:`Source.derived_from`, a merged adapter) is computed from the piece just read
    there, so those bytes are read once."""
    name = read.item.name
    out: list[torch.Tensor | None] = []
    for k, src in enumerate(sources):
        if k not in read.sides:
            out.append(None)
            continue
        origin = src.derived_from(name)
        given = next((t for j, t in enumerate(out) if sources[j] is origin and t is not None), None)
        if count is None:
            whole = src.read_full(name) if given is None else src.derive(name, given.reshape(-1))
            out.append(whole.reshape(src.infos[name].shape))
        elif given is None:
            out.append(src.read(name, start, count, out=outs[k] if outs is not None else None))
        else:
            out.append(src.derive(name, given, start, count))
    return tuple(out)


def iter_chunks(
    sources: Sequence[Source],
    reads: Sequence[Read],
    *,
    device: torch.device | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    depth: int = 2,
) -> Iterator[Chunk]:
    """Tensors as flat chunks of at most ``chunk_bytes`` per side, prefetched, on ``device``.

    The CPU tensors of a chunk live in a small ring of reused buffers: they stay valid until the consumer
    asks for the next chunk, and must not be kept beyond that (copy what you need).
    """
    ring = depth + 2  # chunks in the queue, one being read, one being consumed
    buffers = [[np.empty(max(chunk_bytes, 8), dtype=np.uint8) for _ in range(ring)] for _ in sources]

    def produce() -> Iterator[Chunk]:
        slot = 0
        for read in reads:
            item = read.item
            numel = item.base.numel
            step = _chunk_elems(item, chunk_bytes)
            start = 0
            while True:
                count = min(step, numel - start)
                ts = _read_sides(sources, read, start, count, [b[slot] for b in buffers])
                slot = (slot + 1) % ring
                yield Chunk(item, start, ts, start + count >= numel)
                start += count
                if start >= numel:
                    break

    for chunk in prefetch(produce(), depth, lambda: _abandon(sources)):
        if on_bytes is not None:
            on_bytes(chunk.nbytes)
        yield Chunk(chunk.item, chunk.start, _to(chunk.tensors, device), chunk.last)


def iter_tensors(
    sources: Sequence[Source],
    reads: Sequence[Read],
    *,
    device: torch.device | None = None,
    on_bytes: Callable[[int], None] | None = None,
    depth: int = 1,
) -> Iterator[tuple[Read, Tensors]]:
    """Whole tensors in their stored shapes, one aligned set at a time, on ``device``."""

    def produce() -> Iterator[tuple[Read, Tensors]]:
        for read in reads:
            yield read, _read_sides(sources, read)

    for read, ts in prefetch(produce(), depth, lambda: _abandon(sources)):
        if on_bytes is not None:
            on_bytes(_nbytes(ts))
        yield read, _to(ts, device)
