"""The pipeline: one pass feeds every analysis, each byte is read once, batches are pure, sources close once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch
from factory import CountingSource, as_two_ranks, bump_ulps, llama_like, save_single

from ckptdiff.analyses.consistency import ConsistencyAnalysis, consistency
from ckptdiff.analyses.principal import PrincipalAnalysis, principal_overlap
from ckptdiff.analyses.sparsity import SparsityAnalysis, sparsity
from ckptdiff.analyses.spectral import SpectralAnalysis, spectral
from ckptdiff.engine.alignment import Aligned, Status, align
from ckptdiff.engine.pipeline import Analysis, Form, Run, execute, open_sources
from ckptdiff.engine.reader import prefetch
from ckptdiff.errors import InputError
from ckptdiff.io.resolve import open_stored
from ckptdiff.io.source import Source


def _run(sources: Sequence[Source], labels: Sequence[str], budget: int = 2 * 1024**3) -> Run:
    items = tuple(align(sources, labels=labels))
    return Run(tuple(sources), tuple(labels), items, torch.device("cpu"), budget)


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base and two fine-tunes with known, different changes; ft2 lacks lm_head; one fp32 1-D tensor."""
    base = llama_like(layers=2, d=16, ff=32, seed=0)
    base["model.extra.scale"] = torch.linspace(0.5, 1.5, 16)  # fp32, 1-D: chunked only
    ft1 = {k: v.clone() for k, v in base.items()}
    ft2 = {k: v.clone() for k, v in base.items()}
    ft1["model.layers.0.mlp.up_proj.weight"] = bump_ulps(base["model.layers.0.mlp.up_proj.weight"], torch.arange(40))
    ft1["model.extra.scale"] = bump_ulps(base["model.extra.scale"], torch.arange(3), 2)
    ft2["model.layers.1.self_attn.q_proj.weight"] = bump_ulps(
        base["model.layers.1.self_attn.q_proj.weight"], torch.arange(7), 3
    )
    del ft2["lm_head.weight"]
    return (
        save_single(base, tmp_path / "base.safetensors"),
        save_single(ft1, tmp_path / "ft1.safetensors"),
        save_single(ft2, tmp_path / "ft2.safetensors"),
    )


def test_one_pass_reads_each_byte_once_and_matches_the_single_commands(trio: tuple[Path, Path, Path]) -> None:
    srcs = [CountingSource(open_stored(str(p))) for p in trio]
    labels = ("base", "ft1", "ft2")
    run = _run(srcs, labels)
    analyses: list[Analysis] = [
        SparsityAnalysis(sides=(0, 1)),
        PrincipalAnalysis(k=4, svd="exact", sides=(0, 1)),
        SpectralAnalysis(k=4, sides=(0, 1)),
        SparsityAnalysis(sides=(0, 2)),
        ConsistencyAnalysis(["ft1", "ft2"]),
    ]
    sp1, pr1, spec1, sp2, cons = execute(run, analyses, progress=False)
    for src in srcs:  # every tensor that anything needs, read exactly once from every side that has it
        for name, info in src.infos.items():
            assert src.bytes[name] in (0, info.nbytes), name
    assert srcs[0].bytes["lm_head.weight"] == srcs[1].bytes["lm_head.weight"] > 0  # pair (0, 1) compares it
    assert sum(srcs[2].bytes.values()) == sum(i.nbytes for i in srcs[2].infos.values())

    # The same numbers as the single commands, which each read the pair on their own.
    b, f1, f2 = (str(p) for p in trio)
    pd.testing.assert_frame_equal(sp1.to_frame(), sparsity(b, f1, progress=False).to_frame())
    pd.testing.assert_frame_equal(sp2.to_frame(), sparsity(b, f2, progress=False).to_frame())
    single_pr = principal_overlap(b, f1, k=4, svd="exact", progress=False).to_frame()
    pd.testing.assert_frame_equal(pr1.to_frame(), single_pr)
    pd.testing.assert_frame_equal(spec1.to_frame(), spectral(b, f1, k=4, progress=False).to_frame())
    pd.testing.assert_frame_equal(cons.to_frame(), consistency(b, [f1, f2], progress=False).to_frame())
    # Known by construction: 40 + 3 entries changed in ft1, 7 in ft2 (whose lm_head is only in the base).
    assert int(sp1.overall()["changed"]) == 43
    assert int(sp2.overall()["changed"]) == 7
    rows2 = sp2.to_frame().set_index("tensor")
    assert rows2.loc["lm_head.weight", "status"] == Status.ONLY_BASE.value
    assert sp1.to_frame().set_index("tensor").loc["lm_head.weight", "status"] == Status.OK.value


class Recorder(Analysis):
    """Records what the pipeline hands it."""

    name = "recorder"

    def __init__(self, form: Form, cost: int = 1, sides: Sequence[int] = (0, 1)):
        super().__init__(sides)
        self.wanted = form
        self.cost = cost
        self.batches: list[tuple[list[str], list[torch.dtype]]] = []
        self.seen: list[tuple[str, int, int]] = []

    def form(self, item: Aligned) -> Form | None:
        if self.wanted is Form.MATRIX:
            return Form.MATRIX if item.is_matrix else None
        return self.wanted if item.comparable else None

    def matrix_bytes(self, item: Aligned) -> int:
        return self.cost

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        self.seen.append((item.name, start, tensors[0].numel()))

    def on_tensor(self, item: Aligned, tensors: tuple[torch.Tensor, ...]) -> None:
        self.seen.append((item.name, 0, tensors[0].numel()))

    def on_batch(self, items: Sequence[Aligned], stacks: tuple[torch.Tensor, ...]) -> None:
        self.batches.append(([it.name for it in items], [s.dtype for s in stacks]))

    def finish(self, run: Run) -> None:
        return None


def test_batches_hold_one_shape_and_one_dtype_per_side_within_the_budget(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"m.a{i}": torch.randn(8, 4, generator=g) for i in range(5)}
    sd["m.b"] = torch.randn(8, 4, generator=g).bfloat16()  # same shape, other dtype: its own batch
    sd["m.c"] = torch.randn(4, 4, generator=g)
    src = open_stored(str(save_single(sd, tmp_path / "x.safetensors")))
    rec = Recorder(Form.MATRIX, cost=100)
    execute(_run([src, src], ("base", "ft"), budget=250), [rec], progress=False)  # two matrices per batch
    got = sorted(rec.batches)
    assert got == sorted(
        [
            (["m.a0", "m.a1"], [torch.float32] * 2),
            (["m.a2", "m.a3"], [torch.float32] * 2),
            (["m.a4"], [torch.float32] * 2),
            (["m.b"], [torch.bfloat16] * 2),
            (["m.c"], [torch.float32] * 2),
        ]
    )


def test_chunks_cover_every_entry_once_and_matrices_go_whole_to_elementwise_analyses(tmp_path: Path) -> None:
    sd = {"big.vec": torch.arange(10_000, dtype=torch.float32), "m.w": torch.ones(6, 5)}
    src = open_stored(str(save_single(sd, tmp_path / "x.safetensors")))
    chunks, mats = Recorder(Form.CHUNKS), Recorder(Form.MATRIX)
    run = dataclasses.replace(_run([src, src], ("base", "ft")), chunk_bytes=4096)  # 1,024 fp32 per piece
    execute(run, [chunks, mats], progress=False)
    covered: Counter[str] = Counter()
    for name, _start, n in chunks.seen:
        covered[name] += n
    assert covered == {"big.vec": 10_000, "m.w": 30}
    assert [s for name, s, _ in chunks.seen if name == "big.vec"] == list(range(0, 10_000, 1024))
    assert ("m.w", 0, 30) in chunks.seen  # the matrix, read once for the SVD analysis, is one piece here
    assert [b[0] for b in mats.batches] == [["m.w"]]


def test_sources_passed_in_stay_open_and_opened_ones_close_once_even_on_failure(tmp_path: Path) -> None:
    path = save_single({"a": torch.ones(3)}, tmp_path / "a.safetensors")
    mine = CountingSource(open_stored(str(path)))
    with open_sources([mine, str(path)]) as sources:
        assert sources[0] is mine
        opened = sources[1]
    assert mine.closed == 0
    closes: list[str] = []
    real_close = type(opened).close

    def spy(self: Source) -> None:
        closes.append(self.spec)
        real_close(self)  # type: ignore[arg-type]

    type(opened).close = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(InputError), open_sources([str(path), str(tmp_path / "missing.safetensors")]):
            pass
    finally:
        type(opened).close = real_close  # type: ignore[method-assign]
    assert closes == [str(path)]


class _Boom(Exception):
    pass


def _items(n: int, fail_at: int | None = None, delay: float = 0.0) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise _Boom(f"item {i}")
        time.sleep(delay)
        yield i


@pytest.mark.parametrize(
    ("n", "fail_at", "take", "expect", "raises"),
    [
        (5, None, None, [0, 1, 2, 3, 4], False),  # everything, in order
        (0, None, None, [], False),  # empty producer
        (5, 3, None, [0, 1, 2], True),  # the producer's error reaches the consumer after what came before
        (5, 0, None, [], True),  # ... also on the very first item
        (100, None, 2, [0, 1], False),  # the consumer stops early: the worker stops too
    ],
)
def test_prefetch_order_errors_and_early_stop(
    n: int, fail_at: int | None, take: int | None, expect: list[int], raises: bool
) -> None:
    got: list[int] = []
    before = threading.active_count()
    gen = prefetch(_items(n, fail_at, delay=0.001), depth=2)
    try:
        for x in gen:
            got.append(x)
            if take is not None and len(got) == take:
                break
    except _Boom:
        assert raises
    else:
        assert not raises
    finally:
        gen.close()
    assert got == expect
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # no prefetch thread left behind


def test_a_failing_analysis_aborts_every_analysis(tmp_path: Path) -> None:
    src = open_stored(str(save_single({"m.w": torch.ones(4, 4)}, tmp_path / "x.safetensors")))

    class Failing(Recorder):
        def on_batch(self, items: Sequence[Aligned], stacks: tuple[torch.Tensor, ...]) -> None:
            raise _Boom("in the middle")

    aborted: list[str] = []

    class Watching(Recorder):
        def abort(self) -> None:
            aborted.append("watching")

    with pytest.raises(_Boom):
        execute(_run([src, src], ("base", "ft")), [Watching(Form.CHUNKS), Failing(Form.MATRIX)], progress=False)
    assert aborted == ["watching"]


@pytest.mark.parametrize(
    ("base", "ft", "expect"),
    [
        ({"a.weight": torch.ones(4, 4)}, {"a.weight": torch.ones(4, 5)}, "1 shape mismatch"),
        ({"a.weight": torch.ones(4)}, {"b.weight": torch.ones(4)}, "1 only base, 1 only ft"),
        (
            {"model.q.weight": torch.ones(4, 4)},
            {
                "base_model.model.q.lora_A.weight": torch.ones(2, 4),
                "base_model.model.q.lora_B.weight": torch.ones(4, 2),
            },
            "LoRA adapter",
        ),
    ],
)
def test_nothing_comparable_is_an_input_error_that_says_why(
    tmp_path: Path, base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], expect: str
) -> None:
    b = save_single(base, tmp_path / "b.safetensors")
    f = save_single(ft, tmp_path / "f.safetensors")
    with pytest.raises(InputError, match="nothing to compare") as err:
        sparsity(str(b), str(f), progress=False)
    assert expect in str(err.value)


def test_a_glob_that_matches_nothing_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_single({"m.a.weight": torch.ones(3), "m.b.weight": torch.ones(3)}, tmp_path / "x.safetensors")
    with caplog.at_level("WARNING", logger="ckptdiff"):
        result = sparsity(str(path), str(path), include=["m.a.*", "m.typo.*"], progress=False)
    assert list(result.to_frame()["tensor"]) == ["m.a.weight"]
    assert [r.getMessage() for r in caplog.records] == [
        "include 'm.typo.*' matches no tensor name; check the glob (it matches full names)"
    ]


def test_batches_hold_at_most_max_batch_matrices_whatever_the_budget(tmp_path: Path) -> None:
    from ckptdiff.engine.pipeline import MAX_BATCH

    sd = {f"m.w{i:02d}": torch.full((3, 2), float(i)) for i in range(MAX_BATCH + 2)}
    src = open_stored(str(save_single(sd, tmp_path / "x.safetensors")))
    rec = Recorder(Form.MATRIX, cost=1)
    execute(_run([src, src], ("base", "ft"), budget=10**12), [rec], progress=False)
    assert [len(names) for names, _ in rec.batches] == [MAX_BATCH, 2]


def test_states_merged_from_two_ranks_give_the_one_process_results(trio: tuple[Path, Path, Path]) -> None:
    srcs = [open_stored(str(p)) for p in trio]
    run = _run(srcs, ("base", "ft1", "ft2"))

    def make() -> list[Analysis]:
        return [
            SparsityAnalysis(sides=(0, 1)),
            PrincipalAnalysis(k=4, svd="exact", sides=(0, 2)),
            SpectralAnalysis(k=4, null="random", sides=(0, 1)),
            ConsistencyAnalysis(["ft1", "ft2"]),
        ]

    whole = execute(run, make(), progress=False)
    split = as_two_ranks(run, make)
    for one, two in zip(whole, split, strict=True):
        pd.testing.assert_frame_equal(one.to_frame(), two.to_frame())
