"""The pipeline: one pass over the checkpoints that feeds every analysis asking for a tensor.

An analysis is a plug-in (:class:`Analysis`): it says which sides it compares (base and one fine-tune, or the
base and every fine-tune), in which :class:`Form` it wants each aligned tensor, and turns what it gets into
per-tensor results with pure metric functions. The pipeline owns everything else, once: opening and closing
the sources, the device, alignment, the memory budget, progress and the order of reads. Each byte of each
checkpoint is read at most once per run, whatever mix of analyses runs:

1. tensors only element-wise analyses want are read in flat chunks through a ring of reused buffers;
2. tensors some analysis wants whole (and that are not matrices for an SVD analysis) are read whole;
3. 2-D matrices an SVD analysis wants are read whole, grouped by shape and dtypes, handed one by one to the
   element-wise and whole-tensor analyses, and stacked into batches (within the memory budget) for the SVDs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from ckptdiff.alignment import Aligned, align
from ckptdiff.analyses.common import SourceLike, header, open_source
from ckptdiff.errors import InputError
from ckptdiff.metrics.mask import CompareMode
from ckptdiff.progress import byte_progress
from ckptdiff.sources import Source
from ckptdiff.stream import CHUNK_BYTES, Read, Tensors, iter_chunks, iter_tensors, resolve_device


class Form(Enum):
    """How an analysis wants one aligned tensor."""

    CHUNKS = "chunks"  # flat pieces in any order of size; counts must be additive over pieces
    TENSOR = "tensor"  # the whole tensor, in its stored shape
    MATRIX = "matrix"  # (b, m, n) stacks of same-shape, same-dtype matrices, for batched SVDs


def default_budget(device: torch.device) -> int:
    """Bytes one batched call may spend: half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 * 1024**3


def budget_bytes(batch_budget: float | None, device: torch.device) -> int:
    """--batch-budget in GiB as bytes, or the device's default budget."""
    if batch_budget is None:
        return default_budget(device)
    if not batch_budget > 0:
        raise InputError(f"--batch-budget must be a positive number of GiB, got {batch_budget}")
    return int(batch_budget * 1024**3)


@dataclass(frozen=True)
class Run:
    """What every analysis of one pass shares: the open sources, their labels, the tensors, device and budget."""

    sources: tuple[Source, ...]
    labels: tuple[str, ...]  # "base", then one label per fine-tune
    items: tuple[Aligned, ...]  # aligned over every source
    device: torch.device
    budget: int
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chunk_bytes: int = CHUNK_BYTES  # per side, for tensors read in pieces

    def header(
        self, analysis: str, sides: Sequence[int], mode: CompareMode | None = None, **params: object
    ) -> dict[str, str]:
        """The report header of one analysis over ``sides``: inputs as resolved, mode, parameters, device."""
        roles = ["base", "ft"] if len(sides) == 2 else ["base", *(f"ft {self.labels[k]}" for k in sides[1:])]
        for key, globs in self.filters.items():
            if globs:
                params[key] = ", ".join(globs)
        return header(analysis, [self.sources[k] for k in sides], roles, self.device, mode, **params)


class Analysis(ABC):
    """A plug-in: which tensors it needs and in what form, what it makes of them, and its result.

    ``sides`` are indices into the run's sources, the base first (``(0, r)`` compares fine-tune r with the base).
    The pipeline hands every hook the aligned tensor as seen from those sides only (its status is that of the
    pair), and the tensors of those sides only, in the same order.
    """

    name: ClassVar[str]

    def __init__(self, sides: Sequence[int] = (0, 1)) -> None:
        self.sides = tuple(sides)

    @abstractmethod
    def form(self, item: Aligned) -> Form | None:
        """How this analysis wants ``item`` (None: not at all)."""

    def matrix_bytes(self, item: Aligned) -> int:
        """Peak bytes one matrix of ``item``'s shape and dtypes costs inside a batch (Form.MATRIX only)."""
        raise NotImplementedError(f"{type(self).__name__} asked for matrices but sets no memory cost")

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:  # noqa: B027 - optional hook
        """Called once before any read with the aligned tensors as seen from this analysis's sides."""

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """A flat piece [start, start + len) of ``item`` (Form.CHUNKS)."""
        raise NotImplementedError

    def on_tensor(self, item: Aligned, tensors: tuple[torch.Tensor, ...]) -> None:
        """The whole of ``item`` in its stored shape (Form.TENSOR)."""
        raise NotImplementedError

    def on_batch(self, items: Sequence[Aligned], stacks: tuple[torch.Tensor, ...]) -> None:
        """(b, m, n) stacks of same-shape, same-dtype matrices, one per side (Form.MATRIX)."""
        raise NotImplementedError

    def abort(self) -> None:  # noqa: B027 - optional hook
        """The run failed or was interrupted: drop anything half-written."""

    @abstractmethod
    def finish(self, run: Run) -> Any:
        """The analysis's result, once every tensor it asked for has been seen."""


@contextlib.contextmanager
def open_sources(specs: Sequence[SourceLike], progress: bool = True) -> Iterator[tuple[Source, ...]]:
    """Open every input; close, once, the ones opened here (a Source passed in is its caller's to close)."""
    opened: list[Source] = []
    out: list[Source] = []
    try:
        for spec in specs:
            if isinstance(spec, Source):
                out.append(spec)
            else:
                src = open_source(spec, progress)
                opened.append(src)
                out.append(src)
        yield tuple(out)
    finally:
        for src in opened:
            src.close()


@dataclass
class _Plan:
    """Who wants each aligned tensor, in what form, and which sides must be read for it."""

    item: Aligned
    wants: list[tuple[Analysis, Aligned, Form]]

    @property
    def sides(self) -> tuple[int, ...]:
        return tuple(sorted({k for a, _, _ in self.wants for k in a.sides}))

    def forms(self) -> set[Form]:
        return {f for _, _, f in self.wants}


def _pick(tensors: Tensors, sides: Sequence[int]) -> tuple[torch.Tensor, ...]:
    out = tuple(tensors[k] for k in sides)
    assert all(t is not None for t in out), "the pipeline reads every side an analysis asked for"
    return out  # type: ignore[return-value]


def _feed_elementwise(plan: _Plan, tensors: Tensors) -> None:
    """Give a tensor read whole to the analyses that want it as chunks or whole."""
    for a, item, form in plan.wants:
        if form is Form.CHUNKS:
            a.on_chunk(item, 0, tuple(t.reshape(-1) for t in _pick(tensors, a.sides)))
        elif form is Form.TENSOR:
            a.on_tensor(item, _pick(tensors, a.sides))


def plan_reads(run: Run, analyses: Sequence[Analysis]) -> list[_Plan]:
    """For every aligned tensor, the analyses that want it (from their sides' view) and how."""
    plans: list[_Plan] = []
    views: dict[Analysis, list[Aligned]] = {a: [] for a in analyses}
    for item in run.items:
        wants: list[tuple[Analysis, Aligned, Form]] = []
        for a in analyses:
            labels = [run.labels[k] for k in a.sides]
            view = item if len(a.sides) == len(run.sources) else item.project(a.sides, labels)
            views[a].append(view)
            form = a.form(view)
            if form is not None:
                wants.append((a, view, form))
        if wants:
            plans.append(_Plan(item, wants))
    for a in analyses:
        a.prepare(run, views[a])
    return plans


def _group_key(plan: _Plan) -> tuple[object, ...]:
    infos = [plan.item.infos[k] for k in plan.sides]
    return (plan.item.base.shape, plan.sides, *(i.dtype.name if i is not None else None for i in infos))


def execute(run: Run, analyses: Sequence[Analysis], progress: bool = True, label: str = "reading") -> list[Any]:
    """Run ``analyses`` over ``run`` in one pass; return their results in order."""
    plans = plan_reads(run, analyses)
    matrices = [p for p in plans if Form.MATRIX in p.forms()]
    whole = [p for p in plans if Form.TENSOR in p.forms() and Form.MATRIX not in p.forms()]
    chunked = [p for p in plans if p.forms() == {Form.CHUNKS}]
    total = sum(Read(p.item, p.sides).nbytes for p in plans)
    try:
        with byte_progress(total, label, progress) as on_bytes:
            by_name = {p.item.name: p for p in chunked}
            reads = [Read(p.item, p.sides) for p in chunked]
            for chunk in iter_chunks(
                run.sources, reads, device=run.device, chunk_bytes=run.chunk_bytes, on_bytes=on_bytes
            ):
                for a, item, _ in by_name[chunk.item.name].wants:
                    a.on_chunk(item, chunk.start, _pick(chunk.tensors, a.sides))
            by_name = {p.item.name: p for p in whole}
            reads = [Read(p.item, p.sides) for p in whole]
            for read, tensors in iter_tensors(run.sources, reads, device=run.device, on_bytes=on_bytes):
                _feed_elementwise(by_name[read.item.name], tensors)
            _matrix_pass(run, matrices, on_bytes)
        return [a.finish(run) for a in analyses]
    except BaseException:
        for a in analyses:
            a.abort()
        raise


def _matrix_pass(run: Run, plans: Sequence[_Plan], on_bytes: Callable[[int], None]) -> None:
    """Matrices grouped by (shape, sides, dtypes), read once, batched for every SVD analysis within the budget."""
    groups: dict[tuple[object, ...], list[_Plan]] = {}
    for p in plans:
        groups.setdefault(_group_key(p), []).append(p)
    ordered = [p for group in groups.values() for p in group]
    by_name = {p.item.name: p for p in ordered}
    batch: list[_Plan] = []
    parts: dict[int, list[torch.Tensor]] = {}
    # Progress follows the work: a matrix's bytes are reported once its batch's SVDs are done, not when read.
    batch_bytes, last_read = [0], [0]

    def cap(p: _Plan) -> int:
        costs = [a.matrix_bytes(item) for a, item, form in p.wants if form is Form.MATRIX]
        return max(1, run.budget // max(1, *costs))

    def flush() -> None:
        stacks = {k: torch.stack(v) for k, v in parts.items()}  # (b, m, n) per side, one dtype each
        n = len(batch)
        for a, _, form in batch[0].wants:
            if form is Form.MATRIX:
                views = [next(v for b, v, f in p.wants if b is a) for p in batch]
                a.on_batch(views, tuple(stacks[k] for k in a.sides))
        batch.clear()
        parts.clear()
        del stacks
        assert n > 0
        on_bytes(batch_bytes[0])
        batch_bytes[0] = 0

    def read_bytes(nbytes: int) -> None:
        last_read[0] = nbytes

    reads = [Read(p.item, p.sides) for p in ordered]
    for read, tensors in iter_tensors(run.sources, reads, device=run.device, on_bytes=read_bytes):
        plan = by_name[read.item.name]
        if batch and (_group_key(plan) != _group_key(batch[0]) or len(batch) >= cap(batch[0])):
            flush()
        batch_bytes[0] += last_read[0]
        _feed_elementwise(plan, tensors)
        batch.append(plan)
        for k in plan.sides:
            t = tensors[k]
            assert t is not None
            parts.setdefault(k, []).append(t)
    if batch:
        flush()


def run_analyses(
    specs: Sequence[SourceLike],
    analyses: Sequence[Analysis],
    *,
    labels: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    batch_budget: float | None = None,
    progress: bool = True,
    label: str = "reading",
) -> list[Any]:
    """Open ``specs``, align them, run ``analyses`` in one pass, close what was opened; the results in order."""
    dev = resolve_device(device)
    budget = budget_bytes(batch_budget, dev)
    with open_sources(specs, progress) as sources:
        items = align(sources, include, exclude, labels=labels)
        filters = {"include": tuple(include), "exclude": tuple(exclude)}
        run = Run(sources, tuple(labels), tuple(items), dev, budget, filters)
        return execute(run, analyses, progress, label)
