"""``patch create`` and ``patch size``: the plug-in on the one pass, its result, and the library functions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import torch

from ckptdiff.analyses.base import Report, Table, item_detail, row_basics
from ckptdiff.analyses.patch.common import (
    BASE_KEY,
    FORMAT,
    FORMAT_VERSION,
    FT_KEY,
    INDEX_NP,
    PATCH_INDEX,
    PIECE,
    SINGLE,
    Scratch,
    copy_stored,
    ft_layout,
    hash_stored,
    hub_commit,
    itemsize_of,
    raw_bytes,
)
from ckptdiff.engine.alignment import Aligned
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.errors import InputError
from ckptdiff.io import resolve
from ckptdiff.io.formats.safetensors_writer import Planned, StreamWriter
from ckptdiff.io.outputs import Output, OutputFolder, standalone
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.metrics.patch import (
    Encoding,
    PatchCost,
    changed_indices,
    gap_escapes,
    index_itemsize,
    patch_cost,
    stored_bits,
)

COLUMNS = [
    "tensor",
    "stack",
    "layer",
    "module",
    "shape",
    "dtype_base",
    "dtype_ft",
    "numel",
    "changed",
    "encoding",
    "patch_bytes",
    "sparse_bytes",
    "bitmask_bytes",
    "dense_bytes",
    "gaps_bytes",
    "ft_bytes",
    "status",
    "detail",
]


@dataclass(frozen=True)
class Piece:
    """One tensor of the patch file: its key and dtype/shape, and where its bytes wait in a scratch file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorPatch:
    """What the patch holds for one fine-tune tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    changed: int
    encoding: Encoding  # "none" (unchanged), "sparse", "bitmask" or "dense"
    escapes: int | None  # gaps past a uint16 (for the gap encoding's size); None when carried whole
    whole: bool  # carried whole because it was added, reshaped or re-typed
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass
class _Open:
    """A tensor whose chunks are arriving."""

    hash_base: Any
    hash_ft: Any
    values_at: int
    aux_at: int
    same: bool  # one dtype on both sides: entries are compared; otherwise the tensor is carried whole
    changed: int = 0
    escapes: int = 0
    last: int = -1


class PatchAnalysis(Analysis):
    """Every tensor of a base/fine-tune pair, compared as stored: hashes, changed entries and (when writing) the
    patch's tensors, chunk by chunk."""

    name = "patch"
    state_fields = ("records", "base_hashes", "ft_hashes", "scratch_paths")

    def __init__(
        self,
        output: Output | OutputFolder | None = None,
        folder: Path | None = None,
        max_shard_bytes: int | None = None,
    ) -> None:
        super().__init__((0, 1))
        self.output = output
        self.max_shard_bytes = max_shard_bytes
        if folder is None and isinstance(output, Output):
            folder = output.target.parent
        elif folder is None and isinstance(output, OutputFolder):
            folder = output.parent
        self.folder = folder
        self.records: dict[str, TensorPatch] = {}
        self.base_hashes: dict[str, str] = {}
        self.ft_hashes: dict[str, str] = {}
        self.scratch_paths: set[str] = set()
        self.items: list[Aligned] = []
        self.open: dict[str, _Open] = {}
        self.scratch: Scratch | None = None
        self.ft_source: Source | None = None
        self.pool: ThreadPoolExecutor | None = None

    @property
    def writing(self) -> bool:
        return self.folder is not None

    def form(self, item: Aligned) -> Form | None:
        return Form.CHUNKS if item.comparable else None

    def prepare(self, run: Run, items: Sequence[Aligned]) -> None:
        self.items = list(items)
        self.ft_source = run.sources[1]
        if self.folder is not None:
            from ckptdiff.runtime import distributed

            w = distributed.world()
            stem = (self.output.path.name if self.output is not None else "patch") + (
                f".rank{w.rank}" if w is not None else ""
            )
            self.scratch = Scratch(self.folder, stem)
            self.scratch_paths |= set(self.scratch.paths.values())

    # -- the chunks of a tensor compared one to one ------------------------------------------------------------

    def on_chunk(self, item: Aligned, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        w0, w1 = (t.cpu() for t in tensors)
        name = item.name
        state = self.open.get(name)
        if state is None or start == 0:
            state = self._start(item)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(2, thread_name_prefix="ckptdiff-sha256")
        # sha256 releases the GIL: both sides hash on their own threads while the entries are compared here
        hashing = [self.pool.submit(h.update, raw_bytes(w)) for h, w in ((state.hash_base, w0), (state.hash_ft, w1))]
        try:
            if state.same:
                idx = changed_indices(w0, w1)
                if idx.size:
                    state.changed += idx.size
                    state.escapes += gap_escapes(idx, state.last - start)  # the previous changed index, chunk-relative
                    state.last = start + int(idx[-1])
                    if self.scratch is not None:
                        self.scratch.write("values", stored_bits(w1)[idx].data)
                        self.scratch.write("aux", (idx + start).astype(INDEX_NP[index_itemsize(item.base.numel)]).data)
            elif self.scratch is not None:
                self.scratch.write("values", raw_bytes(w1))
        finally:
            for job in hashing:  # the chunk's buffers are reused once this returns
                job.result()
        if start + w1.numel() >= item.base.numel:
            self._end(item, state)

    def _start(self, item: Aligned) -> _Open:
        base, ft = item.infos
        assert base is not None and ft is not None  # comparable
        at = (self.scratch.tell("values"), self.scratch.tell("aux")) if self.scratch is not None else (0, 0)
        state = _Open(hashlib.sha256(), hashlib.sha256(), at[0], at[1], base.dtype.name == ft.dtype.name)
        self.open[item.name] = state
        return state

    def _end(self, item: Aligned, state: _Open) -> None:
        del self.open[item.name]
        ft = item.infos[1]
        assert ft is not None
        self.base_hashes[item.name] = state.hash_base.hexdigest()
        self.ft_hashes[item.name] = state.hash_ft.hexdigest()
        if not state.same:  # re-typed: carried whole, already in the values scratch
            self.records[item.name] = self._whole(ft, state.values_at)
            return
        cost = patch_cost(ft.numel, state.changed, ft.dtype.itemsize, escapes=state.escapes)
        pieces: tuple[Piece, ...] = ()
        if self.scratch is not None:
            pieces = self._settle(ft, state, cost)
        self.records[item.name] = TensorPatch(
            ft.name, ft.dtype.name, ft.shape, state.changed, cost.choice, state.escapes, False, pieces
        )

    def _settle(self, ft: TensorInfo, state: _Open, cost: PatchCost) -> tuple[Piece, ...]:
        """Turn the scratch bytes of a finished tensor into the chosen encoding's pieces."""
        sc = self.scratch
        assert sc is not None
        name, k = ft.name, state.changed
        values = Piece(
            f"{name}:values", ft.dtype.name, (k,), sc.paths["values"], state.values_at, k * ft.dtype.itemsize
        )
        isz = index_itemsize(ft.numel)
        if cost.choice == "none":
            sc.cut("values", state.values_at)
            sc.cut("aux", state.aux_at)
            return ()
        if cost.choice == "sparse":
            idx_name = "I32" if isz == 4 else "I64"
            indices = Piece(f"{name}:indices", idx_name, (k,), sc.paths["aux"], state.aux_at, k * isz)
            return (indices, values)
        if cost.choice == "bitmask":
            mask = np.zeros(-(-ft.numel // 8), dtype=np.uint8)
            step = max(1, PIECE // isz)
            for at in range(0, k, step):
                n = min(step, k - at)
                raw = sc.read("aux", state.aux_at + at * isz, n * isz)
                _set_bits(mask, np.frombuffer(raw, dtype=np.int32 if isz == 4 else np.int64).astype(np.int64))
            sc.cut("aux", state.aux_at)
            sc.write("aux", mask.data)
            return (Piece(f"{name}:mask", "U8", (mask.size,), sc.paths["aux"], state.aux_at, mask.size), values)
        # dense: the fine-tune's whole tensor, read again (only when more than 15/16 of a 2-byte tensor changed)
        sc.cut("aux", state.aux_at)
        sc.cut("values", state.values_at)
        assert self.ft_source is not None
        copy_stored(self.ft_source, ft, sc)
        return self._whole(ft, state.values_at, whole=False).pieces

    def _whole(self, ft: TensorInfo, at: int, whole: bool = True) -> TensorPatch:
        assert self.scratch is not None or not self.writing
        pieces: tuple[Piece, ...] = ()
        if self.scratch is not None:
            pieces = (Piece(f"{ft.name}:dense", ft.dtype.name, ft.shape, self.scratch.paths["values"], at, ft.nbytes),)
        return TensorPatch(ft.name, ft.dtype.name, ft.shape, ft.numel, "dense", None, whole, pieces)

    # -- every rank's records on rank 0 ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        if self.scratch is not None:  # rank 0 reads this rank's scratch files next: their bytes must be in them
            self.scratch.flush()
        return super().state()

    def abort(self) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Remove this rank's scratch files (rank 0 removes every rank's once it has written the patch)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None

    def finish(self, run: Run) -> PatchResult:
        base_src, ft_src = run.sources
        for item in self.items:  # tensors not compared one to one (added, removed, reshaped, ...): read here
            if item.name in self.records:
                continue
            self._structural(item, base_src, ft_src)
        for name in base_src.infos:  # a base tensor no item covered (never: alignment lists every name)
            if name not in self.base_hashes:
                self.base_hashes[name] = hash_stored(base_src, base_src.infos[name])
        written: Path | None = None
        try:
            if self.output is not None:
                assert self.scratch is not None
                self.scratch.flush()
                self._write(self.output, base_src, ft_src)
                written = self.output.path
        finally:
            self.cleanup()
            for path in self.scratch_paths:  # the other ranks' scratch files: their bytes are in the patch now
                with contextlib.suppress(OSError):
                    os.unlink(path)
        rows = [self._row(it) for it in self.items]
        return PatchResult(run.header("patch", self.sides), rows, ft_src.total_bytes, written)

    def _structural(self, item: Aligned, base_src: Source, ft_src: Source) -> None:
        base, ft = item.infos
        if base is not None:
            self.base_hashes[item.name] = hash_stored(base_src, base)
        if ft is None:
            return
        at = self.scratch.tell("values") if self.scratch is not None else 0
        self.ft_hashes[item.name] = copy_stored(ft_src, ft, self.scratch)
        self.records[item.name] = self._whole(ft, at)

    def _write(self, output: Output | OutputFolder, base_src: Source, ft_src: Source) -> None:
        order = [n for n in ft_src.infos if n in self.records]
        pieces = [p for n in order for p in self.records[n].pieces]
        # Widest dtypes first: every tensor then starts on a multiple of its item size (the data section starts on
        # a multiple of 8), as the safetensors library lays its files out.
        pieces.sort(key=lambda p: -itemsize_of(p.dtype))
        meta = {
            FORMAT: FORMAT_VERSION,
            BASE_KEY: json.dumps(
                {
                    "source": base_src.resolved,
                    "commit": hub_commit(base_src),
                    "tensors": {n: self.base_hashes[n] for n in base_src.infos},
                    "layout": {n: [i.dtype.name, list(i.shape)] for n, i in base_src.infos.items()},
                }
            ),
            FT_KEY: json.dumps(
                {
                    "source": ft_src.resolved,
                    "commit": hub_commit(ft_src),
                    "tensors": [
                        {
                            "name": n,
                            "dtype": self.records[n].dtype,
                            "shape": list(self.records[n].shape),
                            "sha256": self.ft_hashes[n],
                            "encoding": self.records[n].encoding,
                            "changed": self.records[n].changed,
                        }
                        for n in order
                    ],
                    **ft_layout(ft_src),
                }
            ),
        }
        if isinstance(output, Output):
            with output.writing():
                self._write_file(output.open(), pieces, meta)
            output.finish()
            return
        shards: list[list[Piece]] = [[]]
        size = 0
        for p in pieces:  # cut where the next tensor would pass the size (a larger tensor gets a shard of its own)
            if shards[-1] and self.max_shard_bytes is not None and size + p.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        if n == 1:  # one shard: the folder holds model.safetensors alone (an index may not be empty)
            self._write_file(output.open(SINGLE), shards[0], meta)
            return
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._write_file(output.open(name), shard, meta)
            weight_map.update(dict.fromkeys((p.key for p in shard), name))
        index = {"metadata": {"total_size": sum(p.nbytes for p in pieces)}, "weight_map": weight_map}
        output.open(PATCH_INDEX).write(json.dumps(index, indent=1).encode() + b"\n")

    def _write_file(self, f: IO[bytes], pieces: Sequence[Piece], meta: dict[str, str]) -> None:
        """One safetensors file of ``pieces``, copied from the scratch files."""
        writer = StreamWriter(f, [Planned(p.key, p.dtype, p.shape) for p in pieces], meta)
        handles: dict[str, int] = {}
        try:
            for p in pieces:
                if p.path not in handles:
                    handles[p.path] = os.open(p.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                for at in range(0, p.nbytes, PIECE):
                    n = min(PIECE, p.nbytes - at)
                    data = os.pread(handles[p.path], n, p.offset + at)
                    if len(data) != n:
                        raise InputError(f"scratch file {p.path} ended early; check the disk and run again")
                    writer.write(data)
            writer.close()
        finally:
            for fd in handles.values():
                os.close(fd)

    def _row(self, item: Aligned) -> dict[str, object]:
        basics = row_basics(item)
        row: dict[str, object] = {c: basics.get(c) for c in COLUMNS if c in basics}
        row["detail"] = item_detail(item)
        ft = item.infos[1]
        rec = self.records.get(item.name)
        if ft is None or rec is None:  # removed: the patch records only that it is gone
            row.update(numel=basics["numel"], changed=float("nan"), encoding="removed", patch_bytes=0)
            row.update({c: float("nan") for c in ("sparse_bytes", "bitmask_bytes", "dense_bytes", "gaps_bytes")})
            row["ft_bytes"] = 0
            return row
        row["numel"] = ft.numel
        row["changed"] = rec.changed
        row["ft_bytes"] = ft.nbytes
        if rec.whole:
            row.update(encoding="dense", patch_bytes=ft.nbytes, dense_bytes=ft.nbytes)
            row.update({c: float("nan") for c in ("sparse_bytes", "bitmask_bytes", "gaps_bytes")})
            return row
        cost = patch_cost(ft.numel, rec.changed, ft.dtype.itemsize, escapes=rec.escapes)
        row.update(
            encoding=cost.choice,
            patch_bytes=cost.bytes,
            sparse_bytes=cost.sparse,
            bitmask_bytes=cost.bitmask,
            dense_bytes=cost.dense,
            gaps_bytes=cost.gaps,
        )
        return row


def _set_bits(mask: np.ndarray, idx: np.ndarray) -> None:
    """Set bit ``i % 8`` of byte ``i // 8`` of ``mask`` for every sorted, distinct flat index ``i`` in ``idx``."""
    if idx.size == 0:
        return
    byte = idx >> 3
    bit = np.left_shift(1, (idx & 7)).astype(np.uint8)
    starts = np.flatnonzero(np.diff(byte, prepend=-1))
    mask[byte[starts]] |= np.add.reduceat(bit, starts).astype(np.uint8)  # distinct bits: their sum is their OR


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PatchResult:
    """Per-tensor encodings and sizes of a patch (written by ``patch create``, sized by ``patch size``)."""

    header: dict[str, str]
    rows: list[dict[str, object]] = field(default_factory=list)
    ft_bytes: int = 0  # the fine-tune's tensor bytes as stored
    path: Path | None = None  # the patch file written, if any

    def __repr__(self) -> str:
        o = self.overall()
        return (
            f"<PatchResult: {len(self.rows)} tensors, patch {int(o['patch_bytes']):,} bytes = "
            f"{o['fraction']:.2%} of the fine-tune; .to_frame() .overall() .by() .report()>"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per tensor, columns as in :data:`COLUMNS`."""
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        ints = ["layer", "numel", "changed", "patch_bytes", "sparse_bytes", "bitmask_bytes", "dense_bytes"]
        return df.astype({c: "Int64" for c in [*ints, "gaps_bytes", "ft_bytes"]})

    def overall(self) -> dict[str, float]:
        """Bytes of the patch (the chosen encodings), of the fine-tune, and ``fraction`` = patch / fine-tune; and
        ``all_<encoding>_bytes``: the patch had every changed tensor used that one encoding (tensors carried whole
        count their whole bytes in each)."""
        df = self.to_frame()
        out = {
            "tensors": float(len(df)),
            "patched": float(df["encoding"].isin(["sparse", "bitmask", "dense"]).sum()),
            "patch_bytes": float(df["patch_bytes"].sum()),
            "ft_bytes": float(self.ft_bytes),
        }
        whole = df["encoding"].eq("dense") & df["sparse_bytes"].isna()
        moved = df[df["encoding"].isin(["sparse", "bitmask", "dense"]) & ~whole]
        for enc in ("sparse", "bitmask", "dense", "gaps"):
            col = moved[f"{enc}_bytes"]
            extra = float(df.loc[whole, "patch_bytes"].sum())
            out[f"all_{enc}_bytes"] = float(col.sum()) + extra if not col.isna().any() else float("nan")
        out["fraction"] = out["patch_bytes"] / self.ft_bytes if self.ft_bytes else 0.0
        return out

    def by(self, key: str = "module") -> pd.DataFrame:
        """Bytes per ``module`` type or ``layer``: patch bytes, the fine-tune's bytes, their ratio, encodings."""
        df = self.to_frame()
        if key == "layer":
            df = df.dropna(subset=["layer"])
        g = df.groupby(key, sort=True)
        out = pd.DataFrame(
            {
                "tensors": g.size(),
                "changed": g["changed"].sum(),
                "patch_bytes": g["patch_bytes"].sum(),
                "ft_bytes": g["ft_bytes"].sum(),
            }
        )
        out["fraction"] = out["patch_bytes"] / out["ft_bytes"].where(out["ft_bytes"] > 0)
        for enc in ("sparse", "bitmask", "dense"):
            out[enc] = df["encoding"].eq(enc).groupby(df[key], sort=True).sum().astype("int64")
        return out.astype({"tensors": "int64", "changed": "int64", "patch_bytes": "int64", "ft_bytes": "int64"})

    def report(self) -> Report:
        """The report the CLI renders."""
        o = self.overall()
        df = self.to_frame()
        counts = df["encoding"].value_counts()
        whole = int(((df["encoding"] == "dense") & df["sparse_bytes"].isna()).sum())
        removed = int(counts.get("removed", 0))
        verb = "moves" if self.path is not None else "would move"
        summary = [
            f"A delta sync of this step {verb} {_size(int(o['patch_bytes']))}, {o['fraction']:.2%} of the fine-tune's "
            f"{_size(self.ft_bytes)} (the changed entries as stored; container headers not counted).",
            f"Per tensor, the cheapest exact encoding: {int(counts.get('sparse', 0))} sparse (indices + values), "
            f"{int(counts.get('bitmask', 0))} bitmask + values, {int(counts.get('dense', 0)) - whole} dense, "
            f"{int(counts.get('none', 0))} unchanged; {whole} carried whole (added, reshaped or re-typed), "
            f"{removed} removed.",
        ]
        if not np.isnan(o["all_gaps_bytes"]):
            summary.append(
                f"Had every changed tensor used one encoding: sparse {_size(int(o['all_sparse_bytes']))}, bitmask "
                f"{_size(int(o['all_bitmask_bytes']))}, dense {_size(int(o['all_dense_bytes']))}, uint16 index gaps "
                f"{_size(int(o['all_gaps_bytes']))}."
            )
        if self.path is not None:
            summary.append(f"Patch written to {self.path}.")
        overall = pd.DataFrame({"overall": o})
        overall.index.name = "figure"
        tables = [Table("Overall (bytes)", overall), Table("Per module type", self.by("module"))]
        per_layer = self.by("layer")
        if not per_layer.empty:
            tables.append(Table("Per layer", per_layer))
        return Report("ckptdiff patch", self.header, summary, tables, df)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------------------------------
# create and size


def patch_create(
    base: SourceLike,
    ft: SourceLike,
    output: str | os.PathLike[str] | Output | OutputFolder,
    *,
    max_shard_bytes: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> PatchResult:
    """Write the patch that rebuilds ``ft`` from ``base`` bit for bit to ``output``: one safetensors file, or with
    ``max_shard_bytes`` a new or empty folder of shards of at most that size each and their index."""
    if max_shard_bytes is None and not isinstance(output, OutputFolder):
        given = output.path if isinstance(output, Output) else Path(output)
        if not given.name.endswith(".safetensors"):
            raise InputError(
                f"cannot write --out {given}: a patch file's name ends in .safetensors ('patch apply' reads no "
                "other); give e.g. step.patch.safetensors, or a folder with --max-shard-size"
            )
    out: Output | OutputFolder | None
    if isinstance(output, (Output, OutputFolder)):
        out = output
    elif max_shard_bytes is not None:
        out = OutputFolder("--out", Path(output), [base, ft])
    else:
        out = standalone(Path(output), "--out", [base, ft])
    if max_shard_bytes is not None and (not isinstance(out, OutputFolder) or max_shard_bytes <= 0):
        raise InputError("--max-shard-size needs a positive size and a folder for --out; give both")
    assert out is not None
    analysis = PatchAnalysis(out, max_shard_bytes=max_shard_bytes)
    try:
        result = _run(base, ft, analysis, device, progress, "patching")
        if isinstance(out, OutputFolder) and not isinstance(output, OutputFolder):
            out.commit()  # a folder made here is put in place here; a caller's is the caller's to commit
        return result  # type: ignore[no-any-return]
    except BaseException:
        if isinstance(out, OutputFolder) and not isinstance(output, OutputFolder):
            out.discard()
        raise
    finally:
        analysis.cleanup()


def patch_size(base: SourceLike, ft: SourceLike, *, device: str = "cpu", progress: bool = True) -> PatchResult:
    """What a patch of ``ft`` against ``base`` would take, per tensor and per encoding, without writing it."""
    return _run(base, ft, PatchAnalysis(), device, progress, "sizing")


def _run(base: SourceLike, ft: SourceLike, analysis: PatchAnalysis, device: str, progress: bool, label: str) -> Any:
    from ckptdiff.runtime import distributed

    opened: list[Source] = []
    specs: list[Source] = []

    def open_all() -> None:
        for s in (base, ft):  # as stored: FP8 codes and scales, fused experts, no ties declared
            if isinstance(s, Source):
                specs.append(s)
            else:
                opened.append(resolve.open(s, stored=True, progress=progress and distributed.is_leader()))
                specs.append(opened[-1])

    try:
        distributed.agree(open_all, "opening")
        return run_pair(specs[0], specs[1], analysis, label=label, device=device, progress=progress)
    finally:
        for src in opened:
            src.close()
