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

from ckptdiff import choices
from ckptdiff.engine.alignment import Aligned, align, require_comparable
from ckptdiff.engine.header import header
from ckptdiff.engine.reader import CHUNK_BYTES, Read, Tensors, iter_chunks, iter_tensors, resolve_device
from ckptdiff.engine.shared import SharedSVD, SvdRequest
from ckptdiff.io import resolve
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.metrics.mask import CompareMode
from ckptdiff.runtime.progress import byte_progress


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
    return choices.batch_budget_bytes(batch_budget)


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
    # Attributes (dicts keyed by tensor name, or sets of names) that hold everything the hooks accumulated: under
    # several ranks each rank fills them for its own tensors and rank 0 merges them before ``finish``.
    state_fields: ClassVar[tuple[str, ...]] = ()
    # During on_batch: the batch's shared decompositions (engine.shared), holding what svd_requests declared.
    svds: SharedSVD | None = None

    def __init__(self, sides: Sequence[int] = (0, 1)) -> None:
        self.sides = tuple(sides)

    @abstractmethod
    def form(self, item: Aligned) -> Form | None:
        """How this analysis wants ``item`` (None: not at all)."""

    def matrix_bytes(self, item: Aligned) -> int:
        """Peak bytes one matrix of ``item``'s shape and dtypes costs inside a batch (Form.MATRIX only)."""
        raise NotImplementedError(f"{type(self).__name__} asked for matrices but sets no memory cost")

    def svd_requests(self, item: Aligned) -> Sequence[SvdRequest]:
        """What this analysis needs of ``item``'s SVDs (Form.MATRIX): one request per side it decomposes.

        The pipeline merges every analysis's requests per batch and computes each (side, rounding) once
        (:class:`~ckptdiff.engine.shared.SharedSVD`); ``on_batch`` reads them from ``self.svds``.
        """
        return ()

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

    def cost(self, item: Aligned) -> float:
        """Estimated seconds of compute for ``item`` beyond reading it (for balancing work across ranks)."""
        return 0.0

    def state(self) -> dict[str, Any]:
        """What this rank accumulated (see ``state_fields``), to be merged on rank 0."""
        return {f: getattr(self, f) for f in self.state_fields}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Fold other ranks' states into this one (each tensor is measured on exactly one rank)."""
        for state in states:
            for f, value in state.items():
                mine = getattr(self, f)
                if isinstance(mine, dict):
                    mine.update(value)
                elif isinstance(mine, set):
                    mine |= value
                else:
                    raise TypeError(f"{type(self).__name__}.{f}: state fields must be dicts or sets")

    def abort(self) -> None:  # noqa: B027 - optional hook
        """The run failed or was interrupted: drop anything half-written."""

    @abstractmethod
    def finish(self, run: Run) -> Any:
        """The analysis's result, once every tensor it asked for has been seen."""


@contextlib.contextmanager
def open_sources(
    specs: Sequence[SourceLike], progress: bool = True, merged_dtype: object = None
) -> Iterator[tuple[Source, ...]]:
    """Open every input; close, once, the ones opened here (a Source passed in is its caller's to close).

    The first is the base: a PEFT adapter after it is merged into it (``merged_dtype``, ``--merged-dtype``: what
    the merged weights are stored as; the base's dtype by default).
    """
    merged = choices.merged_dtype(merged_dtype)
    opened: list[Source] = []
    out: list[Source] = []
    try:
        for spec in specs:
            base = out[0] if out else None
            if isinstance(spec, Source):  # the caller's to close; an adapter is merged here all the same
                out.append(resolve.logical(spec, base=base, merged_dtype=merged) if resolve.is_adapter(spec) else spec)
                continue
            src = resolve.open(spec, progress=progress, base=base, merged_dtype=merged)
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
            if view is None:  # tied on every side this analysis compares: no row of its own there
                continue
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


READ_RATE = 2e9  # bytes/s assumed for reading when balancing work across ranks
# At most this many matrices per SVD batch: batching saves call overhead only (BENCHMARKS.md §2), and smaller
# batches are units that ranks can share evenly. Fixed, so a batch is the same in one process or many.
MAX_BATCH = 4


@dataclass
class _Unit:
    """The smallest piece of work given to one rank: a tensor read in chunks, a tensor read whole, or a batch."""

    form: Form
    plans: list[_Plan]

    def nbytes(self) -> int:
        return sum(Read(p.item, p.sides).nbytes for p in self.plans)

    def cost(self) -> float:
        compute = sum(a.cost(item) for p in self.plans for a, item, _ in p.wants)
        return self.nbytes() / READ_RATE + compute


def _units(run: Run, plans: Sequence[_Plan]) -> list[_Unit]:
    """Every plan in a unit, in the single-process order; matrices grouped by (shape, sides, dtypes) into batches.

    A batch's members depend only on the plans, never on how units are spread over ranks, so a batched SVD sees
    the same stack (and gives the same bits) in one process or many.
    """
    units = [_Unit(Form.CHUNKS, [p]) for p in plans if p.forms() == {Form.CHUNKS}]
    units += [_Unit(Form.TENSOR, [p]) for p in plans if Form.TENSOR in p.forms() and Form.MATRIX not in p.forms()]
    groups: dict[tuple[object, ...], list[_Plan]] = {}
    for p in plans:
        if Form.MATRIX in p.forms():
            groups.setdefault(_group_key(p), []).append(p)
    for group in groups.values():
        costs = [a.matrix_bytes(item) for a, item, form in group[0].wants if form is Form.MATRIX]
        cap = min(MAX_BATCH, max(1, run.budget // max(1, *costs)))
        units += [_Unit(Form.MATRIX, group[i : i + cap]) for i in range(0, len(group), cap)]
    return units


def execute(run: Run, analyses: Sequence[Analysis], progress: bool = True, label: str = "reading") -> list[Any]:
    """Run ``analyses`` over ``run`` in one pass; return their results in order.

    Under several ranks (:mod:`ckptdiff.runtime.distributed`) each rank reads and measures its share of the units,
    rank 0 merges the analyses' states and finishes them, and every rank returns rank 0's results.
    """
    from ckptdiff.runtime import distributed

    units = distributed.agree(lambda: _units(run, plan_reads(run, analyses)), "planning")
    w = distributed.world()
    if w is not None:
        owner = distributed.balance([u.cost() for u in units], w.size)
        units = [u for u, r in zip(units, owner, strict=True) if r == w.rank]
        progress = progress and w.leader
    try:
        distributed.agree(lambda: _read_and_measure(run, units, progress, label), "measuring")
        if w is None:
            return [a.finish(run) for a in analyses]
        states = distributed.all_gather([a.state() for a in analyses])
        results = None
        if w.leader:
            for i, a in enumerate(analyses):
                a.merge([s[i] for r, s in enumerate(states) if r != w.rank])
            results = distributed.agree(lambda: [a.finish(run) for a in analyses], "finishing")
        else:
            distributed.agree(lambda: None, "finishing")
        out: list[Any] = distributed.broadcast(results or [])
        return out
    except BaseException:
        for a in analyses:
            a.abort()
        raise


def _read_and_measure(run: Run, units: Sequence[_Unit], progress: bool, label: str) -> None:
    total = sum(u.nbytes() for u in units)
    with byte_progress(total, label, progress) as on_bytes:
        chunked = [p for u in units if u.form is Form.CHUNKS for p in u.plans]
        by_name = {p.item.name: p for p in chunked}
        reads = [Read(p.item, p.sides) for p in chunked]
        for chunk in iter_chunks(run.sources, reads, device=run.device, chunk_bytes=run.chunk_bytes, on_bytes=on_bytes):
            for a, item, _ in by_name[chunk.item.name].wants:
                a.on_chunk(item, chunk.start, _pick(chunk.tensors, a.sides))
        whole = [p for u in units if u.form is Form.TENSOR for p in u.plans]
        by_name = {p.item.name: p for p in whole}
        reads = [Read(p.item, p.sides) for p in whole]
        for read, tensors in iter_tensors(run.sources, reads, device=run.device, on_bytes=on_bytes):
            _feed_elementwise(by_name[read.item.name], tensors)
        _matrix_pass(run, [u.plans for u in units if u.form is Form.MATRIX], on_bytes)


def _matrix_pass(run: Run, batches: Sequence[list[_Plan]], on_bytes: Callable[[int], None]) -> None:
    """Read each batch's matrices once, feed them one by one to the element-wise analyses, then batch the SVDs."""
    plans = [p for b in batches for p in b]
    ends: set[int] = set()
    n = 0
    for b in batches:
        n += len(b)
        ends.add(n - 1)
    current: list[_Plan] = []
    parts: dict[int, list[torch.Tensor]] = {}
    reads = [Read(p.item, p.sides) for p in plans]
    for i, (read, tensors) in enumerate(iter_tensors(run.sources, reads, device=run.device)):
        plan = plans[i]
        assert plan.item.name == read.item.name
        _feed_elementwise(plan, tensors)
        current.append(plan)
        for k in plan.sides:
            t = tensors[k]
            assert t is not None
            parts.setdefault(k, []).append(t)
        del tensors
        if i in ends:
            stacks = {k: torch.stack(v) for k, v in parts.items()}  # (b, m, n) per side, one dtype each
            parts.clear()
            users = [
                (a, [next(v for b, v, f in p.wants if b is a) for p in current])
                for a, _, form in current[0].wants
                if form is Form.MATRIX
            ]
            # One decomposition per (matrix, side) for every analysis of the batch (engine/shared.py).
            shared = SharedSVD(stacks, [r for a, views in users for v in views for r in a.svd_requests(v)])
            for a, views in users:
                a.svds = shared
                try:
                    a.on_batch(views, tuple(stacks[k] for k in a.sides))
                finally:
                    a.svds = None
            del shared
            # Progress follows the work: a batch's bytes count once its SVDs are done, not when it is read.
            on_bytes(sum(Read(p.item, p.sides).nbytes for p in current))
            current = []
            del stacks


@contextlib.contextmanager
def open_run(
    specs: Sequence[SourceLike],
    *,
    labels: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    batch_budget: float | None = None,
    progress: bool = True,
    merged_dtype: object = None,
) -> Iterator[Run]:
    """Resolve the device and budget, open and align the inputs: the :class:`Run` every analysis of a pass shares.

    ``merged_dtype`` (``--merged-dtype``): what a PEFT adapter's merged weights are stored as (see
    :func:`open_sources`). Under several ranks every step is agreed on (a failure on one rank stops all of them
    with its message); the sources opened here are closed on leaving, once.
    """
    from ckptdiff.runtime import distributed

    dev = resolve_device(distributed.device_spec(device))
    budget = budget_bytes(batch_budget, dev)
    with contextlib.ExitStack() as stack:
        opener = open_sources(specs, progress and distributed.is_leader(), merged_dtype)
        sources = distributed.agree(lambda: stack.enter_context(opener), "opening")
        items = distributed.agree(lambda: align(sources, include, exclude, labels=labels), "aligning")
        distributed.agree(lambda: require_comparable(items, sources), "aligning")
        filters = {"include": tuple(include), "exclude": tuple(exclude)}
        yield Run(sources, tuple(labels), tuple(items), dev, budget, filters)


def run_pair(base: SourceLike, ft: SourceLike, analysis: Analysis, *, label: str = "reading", **options: Any) -> Any:
    """One analysis of ``ft`` against ``base`` (what each single command runs); ``options`` as for run_analyses."""
    (result,) = run_analyses([base, ft], [analysis], labels=["base", "ft"], label=label, **options)
    return result


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
    merged_dtype: object = None,
) -> list[Any]:
    """Open ``specs``, align them, run ``analyses`` in one pass, close what was opened; the results in order."""
    with open_run(
        specs,
        labels=labels,
        include=include,
        exclude=exclude,
        device=device,
        batch_budget=batch_budget,
        progress=progress,
        merged_dtype=merged_dtype,
    ) as run:
        return execute(run, analyses, progress, label)
