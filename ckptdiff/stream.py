"""The streaming engine: align checkpoints by tensor name and read them a tensor (or a chunk) at a time.

This module is the one place that knows about reading order, prefetching and devices. Analyses ask it
for aligned tensors and get them on the requested device, one at a time, with a bounded prefetch:
peak memory is set by the largest tensor (or the chunk size), never by the model size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ckptdiff.errors import InputError
from ckptdiff.naming import natural_key, selected
from ckptdiff.sources import Source, TensorInfo

CHUNK_BYTES = 16 * 1024 * 1024  # per side, for element-wise analyses

# Status of an aligned tensor. Comparable statuses are analysed; the rest are structural findings only.
OK = "ok"
DTYPE_CHANGED = "dtype_changed"  # both float, different dtypes: compared after rounding to a common dtype
NON_FLOAT = "non_float"  # integer/bool on every side: compared exactly
SHAPE_MISMATCH = "shape_mismatch"
KIND_MISMATCH = "kind_mismatch"  # float on one side, integer on the other
ONLY_BASE = "only_base"
ONLY_FT = "only_ft"
MISSING = "missing"  # absent from some of several fine-tunes
NON_FINITE = "non_finite"  # set by SVD analyses: a matrix holds NaN or inf, so its metrics are undefined
COMPARABLE = frozenset({OK, DTYPE_CHANGED, NON_FLOAT})


@dataclass(frozen=True)
class Aligned:
    """One tensor name across several checkpoints (index 0 is the base)."""

    name: str
    infos: tuple[TensorInfo | None, ...]
    status: str
    detail: str = ""

    @property
    def comparable(self) -> bool:
        """Whether the entries can be compared one to one."""
        return self.status in COMPARABLE

    @property
    def base(self) -> TensorInfo:
        """The base tensor's header (present for every comparable tensor)."""
        info = self.infos[0]
        assert info is not None, "base info is present for comparable tensors"  # internal invariant
        return info

    @property
    def is_float(self) -> bool:
        """Floating point on every side."""
        return all(i is not None and i.dtype.is_float for i in self.infos)


def _status(infos: Sequence[TensorInfo | None], labels: Sequence[str]) -> tuple[str, str]:
    present = [i for i in infos if i is not None]
    if len(present) < len(infos):
        missing = [labels[k] for k, i in enumerate(infos) if i is None]
        if len(infos) == 2:
            return (ONLY_FT if infos[0] is None else ONLY_BASE), ""
        return MISSING, "absent from " + ", ".join(missing)
    shapes = {i.shape for i in present}
    if len(shapes) > 1:
        return SHAPE_MISMATCH, " vs ".join(str(list(i.shape)) for i in present)
    kinds = {i.dtype.is_float for i in present}
    if len(kinds) > 1:
        return KIND_MISMATCH, " vs ".join(i.dtype.short for i in present)
    if len({i.dtype.name for i in present}) > 1:
        detail = " vs ".join(i.dtype.short for i in present)
        return (DTYPE_CHANGED if present[0].dtype.is_float else NON_FLOAT), detail
    return (OK if present[0].dtype.is_float else NON_FLOAT), ""


def align(
    sources: Sequence[Source],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    labels: Sequence[str] | None = None,
) -> list[Aligned]:
    """Pair tensors by name across checkpoints, filtered by globs, in natural name order."""
    labels = list(labels) if labels is not None else [s.spec for s in sources]
    names: dict[str, None] = {}
    for s in sources:
        names.update(dict.fromkeys(s.infos))
    out: list[Aligned] = []
    for name in sorted(names, key=natural_key):
        if not selected(name, list(include), list(exclude)):
            continue
        infos = tuple(s.infos.get(name) for s in sources)
        status, detail = _status(infos, labels)
        out.append(Aligned(name, infos, status, detail))
    if not out and (include or exclude):
        raise InputError(
            "the --include/--exclude filters match no tensor; check the globs (they match full names, "
            "e.g. 'model.layers.*.mlp.*')"
        )
    return out


# ---------------------------------------------------------------------------------------------
# devices


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec} was asked for but no CUDA GPU is available; use --device cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise InputError(f"--device {spec} is not a valid device; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible; pick another index")
        return dev
    raise InputError(f"--device {spec} is not a valid device; use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------------
# reading with a bounded prefetch

T = TypeVar("T")
_DONE = object()


def prefetch(produce: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run an iterator in a background thread, at most ``depth`` items ahead; re-raise its errors here.

    File reads release the GIL, so reading the next tensor overlaps with computing on this one.
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
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@dataclass(frozen=True)
class Chunk:
    """A flat range [start, start+len) of one aligned tensor, read from every checkpoint."""

    item: Aligned
    start: int
    tensors: tuple[torch.Tensor, ...]
    last: bool  # the final chunk of this tensor

    @property
    def nbytes(self) -> int:
        """Bytes read for this chunk, all sides together."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _chunk_elems(item: Aligned, chunk_bytes: int) -> int:
    widest = max(i.dtype.itemsize for i in item.infos if i is not None)
    return max(1, chunk_bytes // widest)


def iter_chunks(
    sources: Sequence[Source],
    items: Sequence[Aligned],
    *,
    device: torch.device | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    depth: int = 2,
) -> Iterator[Chunk]:
    """Comparable tensors as flat chunks of at most ``chunk_bytes`` per side, prefetched, on ``device``.

    The CPU tensors of a chunk live in a small ring of reused buffers: they stay valid until the consumer
    asks for the next chunk, and must not be kept beyond that (copy what you need).
    """
    ring = depth + 2  # chunks in the queue, one being read, one being consumed
    buffers = [[np.empty(max(chunk_bytes, 8), dtype=np.uint8) for _ in range(ring)] for _ in sources]

    def produce() -> Iterator[Chunk]:
        slot = 0
        for item in items:
            if not item.comparable:
                continue
            numel = item.base.numel
            step = _chunk_elems(item, chunk_bytes)
            start = 0
            while True:
                count = min(step, numel - start)
                ts = tuple(s.read(item.name, start, count, out=buffers[k][slot]) for k, s in enumerate(sources))
                slot = (slot + 1) % ring
                yield Chunk(item, start, ts, start + count >= numel)
                start += count
                if start >= numel:
                    break

    for chunk in prefetch(produce(), depth):
        if on_bytes is not None:
            on_bytes(chunk.nbytes)
        if device is not None and device.type != "cpu":
            chunk = Chunk(chunk.item, chunk.start, tuple(t.to(device) for t in chunk.tensors), chunk.last)
        yield chunk


def iter_tensors(
    sources: Sequence[Source],
    items: Sequence[Aligned],
    *,
    device: torch.device | None = None,
    on_bytes: Callable[[int], None] | None = None,
    depth: int = 1,
) -> Iterator[tuple[Aligned, tuple[torch.Tensor, ...]]]:
    """Whole comparable tensors in their stored shapes, one aligned set at a time, on ``device``."""

    def produce() -> Iterator[tuple[Aligned, tuple[torch.Tensor, ...]]]:
        for item in items:
            if item.comparable:
                yield item, tuple(s.read_full(item.name) for s in sources)

    for item, ts in prefetch(produce(), depth):
        if on_bytes is not None:
            on_bytes(sum(t.numel() * t.element_size() for t in ts))
        if device is not None and device.type != "cpu":
            ts = tuple(t.to(device) for t in ts)
        yield item, ts


# ---------------------------------------------------------------------------------------------
# batches of same-shaped matrices, for batched SVDs


def default_budget(device: torch.device) -> int:
    """Bytes an analysis may spend on one batched call: half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 * 1024**3


def is_matrix(item: Aligned) -> bool:
    """A comparable floating-point 2-D tensor: what the SVD-based analyses work on."""
    return item.comparable and item.is_float and len(item.base.shape) == 2


def iter_matrix_batches(
    sources: Sequence[Source],
    items: Sequence[Aligned],
    max_batch: Callable[[tuple[int, ...]], int],
    *,
    device: torch.device | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[Aligned], tuple[torch.Tensor, ...]]]:
    """2-D float matrices grouped by shape into stacks of at most ``max_batch(shape)``, one per source.

    Yields ``(items, stacks)`` with each stack ``(b, m, n)`` on ``device`` in the stored dtype of its source:
    a batch holds matrices of one shape and one dtype per source, so stacking never converts a value (a bf16
    matrix next to an fp32 one of the same shape would otherwise round the fp32 one). Matrices are read one
    aligned set at a time with a bounded prefetch, so memory holds one batch plus one matrix per source.
    Order: (shape, dtypes) groups in order of first appearance, names in natural order within a group.
    """
    matrices = [it for it in items if is_matrix(it)]
    order: dict[tuple[object, ...], list[Aligned]] = {}
    for it in matrices:
        key = (it.base.shape, *(i.dtype.name for i in it.infos if i is not None))
        order.setdefault(key, []).append(it)
    grouped = [it for group in order.values() for it in group]
    batch: list[Aligned] = []
    parts: list[list[torch.Tensor]] = [[] for _ in sources]

    def flush() -> tuple[list[Aligned], tuple[torch.Tensor, ...]]:
        stacks = tuple(torch.stack(p) for p in parts)  # (b, m, n) per source, one dtype each
        out = (list(batch), stacks)
        batch.clear()
        for p in parts:
            p.clear()
        return out

    def group_of(it: Aligned) -> tuple[object, ...]:
        return (it.base.shape, *(i.dtype.name for i in it.infos if i is not None))

    for item, tensors in iter_tensors(sources, grouped, device=device, on_bytes=on_bytes):
        full = batch and len(batch) >= max(1, max_batch(batch[0].base.shape))
        if batch and (group_of(item) != group_of(batch[0]) or full):
            yield flush()
        batch.append(item)
        for p, t in zip(parts, tensors, strict=True):
            p.append(t)
    if batch:
        yield flush()
