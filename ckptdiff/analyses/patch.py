"""`ckptdiff patch`: the update as an artifact. A sparse patch rebuilds the fine-tune bit for bit from its base.

``patch create`` is a plug-in on the one pass (:class:`PatchAnalysis`, flat chunks of the stored tensors, so Hub
inputs, ``--hub-stream`` and torchrun ranks work as for every analysis). Each rank writes the changed entries of
its tensors to two scratch files beside the output (values; indices or bitmasks); rank 0 merges the records,
writes the patch (one safetensors file, or a folder of shards and their index; layout in docs/patches.md) from the
scratch files, and every scratch file is removed. ``patch size`` is the same pass without writing. ``patch apply``
and ``patch verify`` stream tensor by tensor: each tensor is rebuilt, its sha256 checked against the patch, then
written (or compared).

The patch's layout (format version 1) is :data:`FORMAT_VERSION`; the names of its tensors are ``NAME:indices``,
``NAME:mask``, ``NAME:values`` and ``NAME:dense`` for the fine-tune tensor ``NAME``, as the metadata lists them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import torch

from ckptdiff import dtypes
from ckptdiff.analyses.base import Report, Table, item_detail, row_basics
from ckptdiff.engine.alignment import Aligned
from ckptdiff.engine.pipeline import Analysis, Form, Run, run_pair
from ckptdiff.engine.reader import prefetch
from ckptdiff.errors import InputError
from ckptdiff.io import resolve
from ckptdiff.io.formats.safetensors import SafetensorsSource
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
from ckptdiff.runtime.progress import byte_progress

FORMAT = "ckptdiff.patch"  # metadata key: the format version
FORMAT_VERSION = "1"
BASE_KEY = "ckptdiff.base"  # metadata key: JSON {"source", "tensors": {name: sha256}}
FT_KEY = "ckptdiff.ft"  # metadata key: JSON {"source", "tensors": [...], "shards": {...}, "metadata": {...}}
_INDEX_NP = {4: np.int32, 8: np.int64}
PIECE = 16 * 1024 * 1024  # bytes per read or copy while streaming
SINGLE = "model.safetensors"
PATCH_INDEX = "model.safetensors.index.json"  # a sharded patch is a folder, read like a sharded checkpoint

COLUMNS = [
    "tensor",
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


def sha256_hex(t: torch.Tensor) -> str:
    """sha256 of a tensor's stored bytes (row-major), as hex."""
    return _sha256_raw(_raw(t))


def _sha256_raw(raw: memoryview) -> str:
    return hashlib.sha256(raw).hexdigest()


def _raw(t: torch.Tensor) -> memoryview:
    """A CPU tensor's stored bytes, flat (no copy when contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


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


class _Scratch:
    """One rank's two scratch files beside the output: values, and indices or bitmasks."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.files: dict[str, IO[bytes]] = {}
        self.paths: dict[str, str] = {}
        try:
            for kind in ("values", "aux"):
                fd, path = tempfile.mkstemp(prefix=f".{stem}.{kind}.", suffix=".scratch", dir=folder)
                self.paths[kind] = path
                self.files[kind] = os.fdopen(fd, "w+b")
        except OSError as e:
            self.close()
            raise InputError(
                f"cannot write scratch files in {folder}: {e.strerror or e}; pick another folder"
            ) from None

    def tell(self, kind: str) -> int:
        return self.files[kind].seek(0, os.SEEK_END)

    def write(self, kind: str, data: memoryview | bytes) -> None:
        self.files[kind].write(data)

    def cut(self, kind: str, offset: int) -> None:
        f = self.files[kind]
        f.flush()
        f.truncate(offset)
        f.seek(offset)

    def read(self, kind: str, offset: int, n: int) -> bytes:
        f = self.files[kind]
        f.flush()
        return os.pread(f.fileno(), n, offset)

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.files.clear()


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
        self.scratch: _Scratch | None = None
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
            self.scratch = _Scratch(self.folder, stem)
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
        hashing = [self.pool.submit(h.update, _raw(w)) for h, w in ((state.hash_base, w0), (state.hash_ft, w1))]
        try:
            if state.same:
                idx = changed_indices(w0, w1)
                if idx.size:
                    state.changed += idx.size
                    state.escapes += gap_escapes(idx, state.last - start)  # the previous changed index, chunk-relative
                    state.last = start + int(idx[-1])
                    if self.scratch is not None:
                        self.scratch.write("values", stored_bits(w1)[idx].data)
                        self.scratch.write("aux", (idx + start).astype(_INDEX_NP[index_itemsize(item.base.numel)]).data)
            elif self.scratch is not None:
                self.scratch.write("values", _raw(w1))
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
        _copy_tensor(self.ft_source, ft, sc)
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
                self.base_hashes[name] = _hash_source(base_src, base_src.infos[name])
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
            self.base_hashes[item.name] = _hash_source(base_src, base)
        if ft is None:
            return
        at = self.scratch.tell("values") if self.scratch is not None else 0
        self.ft_hashes[item.name] = _copy_tensor(ft_src, ft, self.scratch)
        self.records[item.name] = self._whole(ft, at)

    def _write(self, output: Output | OutputFolder, base_src: Source, ft_src: Source) -> None:
        order = [n for n in ft_src.infos if n in self.records]
        pieces = [p for n in order for p in self.records[n].pieces]
        # Widest dtypes first: every tensor then starts on a multiple of its item size (the data section starts on
        # a multiple of 8), as the safetensors library lays its files out.
        pieces.sort(key=lambda p: -_itemsize(p.dtype))
        meta = {
            FORMAT: FORMAT_VERSION,
            BASE_KEY: json.dumps(
                {
                    "source": base_src.resolved,
                    "commit": hub_commit(base_src),
                    "tensors": {n: self.base_hashes[n] for n in base_src.infos},
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


def _itemsize(dtype: str) -> int:
    found = dtypes.from_name(dtype)
    return found.itemsize if found is not None else 1


def _set_bits(mask: np.ndarray, idx: np.ndarray) -> None:
    """Set bit ``i % 8`` of byte ``i // 8`` of ``mask`` for every sorted, distinct flat index ``i`` in ``idx``."""
    if idx.size == 0:
        return
    byte = idx >> 3
    bit = np.left_shift(1, (idx & 7)).astype(np.uint8)
    starts = np.flatnonzero(np.diff(byte, prepend=-1))
    mask[byte[starts]] |= np.add.reduceat(bit, starts).astype(np.uint8)  # distinct bits: their sum is their OR


def _hash_source(src: Source, info: TensorInfo) -> str:
    """sha256 of one stored tensor, read in pieces."""
    return _copy_tensor(src, info, None)


def _copy_tensor(src: Source, info: TensorInfo, scratch: _Scratch | None) -> str:
    """Stream one stored tensor into the values scratch file (when given); its sha256."""
    h = hashlib.sha256()
    step = max(1, PIECE // info.dtype.itemsize)
    for at in range(0, info.numel, step):
        raw = _raw(src.read(info.name, at, min(step, info.numel - at)))
        h.update(raw)
        if scratch is not None:
            scratch.write("values", raw)
    return h.hexdigest()


_COMMIT = re.compile(r"(?:@|/snapshots/)([0-9a-f]{40})\b")


def hub_commit(src: Source) -> str:
    """The Hub commit a checkpoint was read at (streamed, or from the Hub cache's snapshot folder), or ""."""
    found = _COMMIT.search(src.resolved)
    return found.group(1) if found else ""


def ft_layout(src: Source) -> dict[str, Any]:
    """How the fine-tune is laid out in files: ``shards`` (tensor -> shard file name, empty for a single file) and
    ``metadata`` (each safetensors file's ``__metadata__``, by shard file name)."""
    files: dict[str, str] = {}
    for name, info in src.infos.items():
        files[name] = Path(info.file.removeprefix("hub:")).name if info.file else SINGLE
    distinct = list(dict.fromkeys(files.values()))
    if len(distinct) <= 1:
        shards: dict[str, str] = {}
        renamed = {d: SINGLE for d in distinct}
    else:
        n = len(distinct)
        renamed = {
            d: d if d.endswith(".safetensors") else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            for i, d in enumerate(distinct)
        }
        shards = {name: renamed[f] for name, f in files.items()}
    metadata: dict[str, dict[str, str]] = {}
    if isinstance(src, SafetensorsSource):
        for path, meta in src.metadata.items():
            metadata[renamed.get(Path(path).name, Path(path).name)] = dict(meta)
    return {"shards": shards, "metadata": metadata}


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


# ---------------------------------------------------------------------------------------------------------------
# Reading a patch


@dataclass(frozen=True)
class FtTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    encoding: Encoding
    changed: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class PatchFile:
    """A patch opened for reading: its header checked, its metadata parsed, every listed tensor present."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if not (self.path.endswith(".safetensors") or Path(self.path).is_dir()):
            raise InputError(
                f"patch {self.path} is not a .safetensors file or a folder of shards; give a patch written by "
                "'ckptdiff patch create'"
            )
        src = resolve.open(self.path, stored=True)
        if not isinstance(src, SafetensorsSource):
            raise InputError(
                f"patch {self.path} is not a safetensors file; give a patch written by 'ckptdiff patch create'"
            )
        self.source = src
        metas = list(src.metadata.values())
        meta = metas[0] if metas else {}
        if any(m != meta for m in metas[1:]):
            raise InputError(
                f"patch {self.path} mixes shards of different patches (their metadata differ); re-create the patch"
            )
        version = meta.get(FORMAT)
        if version is None:
            raise InputError(f"patch {self.path} is not a ckptdiff patch (no {FORMAT} metadata); check the file")
        if version != FORMAT_VERSION:
            raise InputError(
                f"patch {self.path} has format version {version}, and this ckptdiff reads version {FORMAT_VERSION}; "
                "upgrade ckptdiff or re-create the patch"
            )
        try:
            base = json.loads(meta[BASE_KEY])
            ft = json.loads(meta[FT_KEY])
            self.base_source = str(base["source"])
            self.base: dict[str, str] = {str(k): str(v) for k, v in base["tensors"].items()}
            self.ft_source = str(ft["source"])
            self.ft = [
                FtTensor(
                    str(t["name"]),
                    str(t["dtype"]),
                    tuple(int(d) for d in t["shape"]),
                    str(t["sha256"]),
                    t["encoding"],
                    int(t["changed"]),
                )
                for t in ft["tensors"]
            ]
            self.shards: dict[str, str] = {str(k): str(v) for k, v in ft["shards"].items()}
            self.metadata: dict[str, dict[str, str]] = {
                str(k): {str(a): str(b) for a, b in v.items()} for k, v in ft["metadata"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(
                f"patch {self.path} has damaged metadata ({type(e).__name__}: {e}); re-create the patch"
            ) from None
        self.by_name = {t.name: t for t in self.ft}
        for t in self.ft:
            self._check(t)

    def _need(self, key: str, dtype: set[str], shape: tuple[int, ...]) -> None:
        info = self.source.infos.get(key)
        if info is None or info.dtype.name not in dtype or info.shape != shape:
            got = "missing" if info is None else f"{info.dtype.name}{list(info.shape)}"
            raise InputError(
                f"patch {self.path} is damaged: tensor {key!r} is {got}, expected "
                f"{'/'.join(sorted(dtype))}{list(shape)}; re-create the patch"
            )

    def _check(self, t: FtTensor) -> None:
        if t.encoding not in ("none", "sparse", "bitmask", "dense") or dtypes.from_name(t.dtype) is None:
            raise InputError(
                f"patch {self.path} is damaged: tensor {t.name!r} has encoding {t.encoding!r}, dtype {t.dtype}"
            )
        if t.encoding == "dense":
            self._need(f"{t.name}:dense", {t.dtype}, t.shape)
        elif t.encoding == "sparse":
            self._need(f"{t.name}:indices", {"I32" if index_itemsize(t.numel) == 4 else "I64"}, (t.changed,))
            self._need(f"{t.name}:values", {t.dtype}, (t.changed,))
        elif t.encoding == "bitmask":
            self._need(f"{t.name}:mask", {"U8"}, (-(-t.numel // 8),))
            self._need(f"{t.name}:values", {t.dtype}, (t.changed,))

    def read(self, key: str) -> torch.Tensor:
        return self.source.read_full(key)

    def close(self) -> None:
        self.source.close()


def check_chain(patches: Sequence[PatchFile]) -> None:
    """Each patch's base is the previous patch's fine-tune: same tensor names and sha256 hashes, else exit 2."""
    for prev, nxt in itertools.pairwise(patches):
        made = {t.name: t.sha256 for t in prev.ft}
        for name, digest in nxt.base.items():
            if made.get(name) != digest:
                raise InputError(
                    f"patch {nxt.path} does not follow {prev.path}: its base's tensor {name!r} is not what {prev.path} "
                    "makes; give the patches in the order they were made, with none missing"
                )
        extra = [n for n in made if n not in nxt.base]
        if extra:
            raise InputError(
                f"patch {nxt.path} does not follow {prev.path}: tensor {extra[0]!r} that {prev.path} makes is not "
                "in its base; give the patches in the order they were made, with none missing"
            )


def check_base(base: Source, first: PatchFile) -> None:
    """The base's tensors are those the first patch was made against (names, from headers), else exit 2."""
    for name in first.base:
        if name not in base.infos:
            raise InputError(
                f"{base.spec} is not the base of patch {first.path}: it lacks tensor {name!r}; give the checkpoint the "
                f"patch was made from ({first.base_source})"
            )
    for name in base.infos:
        if name not in first.base:
            raise InputError(
                f"{base.spec} is not the base of patch {first.path}: it has tensor {name!r}, which that base did not; "
                f"give the checkpoint the patch was made from ({first.base_source})"
            )


class Rebuilder:
    """The fine-tune's tensors rebuilt one at a time from the base and a chain of patches, each checked by hash.

    :meth:`tensors` reads (and hashes) the next base tensor on a background thread while this one is rebuilt.
    """

    def __init__(self, base: Source, patches: Sequence[PatchFile]) -> None:
        check_chain(patches)
        check_base(base, patches[0])
        self.base = base
        self.patches = list(patches)

    @property
    def last(self) -> PatchFile:
        return self.patches[-1]

    def needs_base(self, name: str) -> bool:
        """Whether the last patch's tensor ``name`` is built on the base's (no patch of the chain replaces it whole)."""
        for patch in reversed(self.patches):
            t = patch.by_name.get(name)
            if t is None or t.encoding == "dense":  # absent earlier: the later patch adds it (whole, checked below)
                return False
        return True

    def tensors(self, names: Sequence[str]) -> Iterator[tuple[FtTensor, torch.Tensor]]:
        """Each named tensor of the last patch rebuilt, flat, in order. Every base tensor used and every intermediate
        result is checked by hash here; the final result's hash is the caller's to check (:meth:`check`), so that it
        can be computed while the bytes are written."""
        first = self.patches[0]

        def produce() -> Iterator[tuple[str, torch.Tensor | None, str]]:
            for name in names:
                if not self.needs_base(name):
                    yield name, None, ""
                    continue
                if name not in self.base.infos:
                    raise InputError(
                        f"patch {first.path} is damaged: it patches tensor {name!r}, which its base lacks; "
                        "re-create the patch"
                    )
                got = self.base.read(name)
                yield name, got, sha256_hex(got)

        for name, base, digest in prefetch(produce(), depth=1, abandon=self.base.abandon_reads):
            if base is not None and digest != first.base[name]:
                raise InputError(
                    f"{self.base.spec} is not the base of patch {first.path}: tensor {name!r} differs from the base "
                    f"the patch was made from ({first.base_source}); nothing was written; give that checkpoint"
                )
            yield self.last.by_name[name], self._level(name, len(self.patches) - 1, base)

    def check(self, t: FtTensor, digest: str) -> None:
        """The last patch's tensor ``t`` was rebuilt to bytes of sha256 ``digest``: refuse if it is not recorded."""
        self._check(self.last, t, digest)

    def _check(self, patch: PatchFile, t: FtTensor, digest: str) -> None:
        if digest != t.sha256:
            raise InputError(
                f"patch {patch.path} is damaged: tensor {t.name!r} rebuilds to bytes whose sha256 differs from the one "
                "the patch records (tampered or corrupted values); nothing was written; re-create the patch"
            )

    def _level(self, name: str, level: int, base: torch.Tensor | None) -> torch.Tensor:
        """Tensor ``name`` after patch ``level``, built on ``base`` (the base's tensor, ours to change)."""
        patch = self.patches[level]
        t = patch.by_name[name]
        if t.encoding == "dense":
            return patch.read(f"{name}:dense").reshape(-1)
        if level > 0:
            if name not in self.patches[level - 1].by_name:
                raise InputError(
                    f"patch {patch.path} is damaged: it patches tensor {name!r}, which its base lacks; re-create it"
                )
            out = self._level(name, level - 1, base)
            self._check(self.patches[level - 1], self.patches[level - 1].by_name[name], sha256_hex(out))
        else:
            if base is None:
                raise InputError(
                    f"patch {patch.path} is damaged: it patches tensor {name!r}, which its base lacks; re-create it"
                )
            out = base
        dt = dtypes.from_torch(out.dtype)
        if out.numel() != t.numel or dt is None or dt.name != t.dtype:
            raise InputError(
                f"patch {patch.path} is damaged: tensor {name!r} does not match its base's; re-create the patch"
            )
        if t.encoding == "none":
            return out
        values = stored_bits(patch.read(f"{name}:values"))
        target = stored_bits(out)
        if t.encoding == "sparse":
            idx = stored_bits(patch.read(f"{name}:indices")).view(
                np.int32 if index_itemsize(t.numel) == 4 else np.int64
            )
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= t.numel):
                raise InputError(
                    f"patch {patch.path} is damaged: tensor {name!r} has indices out of range; re-create the patch"
                )
            target[idx] = values
        else:
            keep = np.unpackbits(stored_bits(patch.read(f"{name}:mask")), count=t.numel, bitorder="little").view(bool)
            if int(np.count_nonzero(keep)) != t.changed:
                raise InputError(
                    f"patch {patch.path} is damaged: tensor {name!r}'s mask does not match its values; "
                    "re-create the patch"
                )
            target[keep] = values
        return out


@contextlib.contextmanager
def _opened(base: SourceLike, patches: Sequence[str | os.PathLike[str]], progress: bool) -> Iterator[Rebuilder]:
    files: list[PatchFile] = []
    src: Source | None = None
    try:
        for p in patches:
            files.append(PatchFile(p))
        src = resolve.open(base, stored=True, progress=progress)
        yield Rebuilder(src, files)
    finally:
        for f in files:
            f.close()
        if src is not None and not isinstance(base, Source):
            src.close()


# ---------------------------------------------------------------------------------------------------------------
# apply and verify


@dataclass(frozen=True)
class ApplyResult:
    """What ``patch apply`` wrote: the files, the tensors and their bytes."""

    path: Path
    files: list[str]
    tensors: int
    nbytes: int


def _shard_plan(patch: PatchFile) -> dict[str, list[FtTensor]]:
    if not patch.shards:
        return {SINGLE: list(patch.ft)}
    plan: dict[str, list[FtTensor]] = {}
    for t in patch.ft:
        plan.setdefault(patch.shards.get(t.name, SINGLE), []).append(t)
    return plan


def patch_apply(
    base: SourceLike,
    patches: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> ApplyResult:
    """Rebuild the fine-tune from ``base`` and the chain ``patches`` into ``output``: a folder (sharded like the
    fine-tune, with its index) or, for an output ending in ``.safetensors``, one file. Written whole or not at all."""
    if not patches:
        raise InputError("patch apply needs at least one PATCH; give the patch files in the order they were made")
    inputs: list[object] = [base, *patches]
    target = Path(output)
    single = target.name.endswith(".safetensors")
    folder = None if single else OutputFolder("--out", target, inputs)
    out_file = standalone(target, "--out", inputs) if single else None
    with _opened(base, patches, progress) as rb:
        last = rb.last
        plan = {target.name: list(last.ft)} if single else _shard_plan(last)
        total = sum(t.numel * _itemsize(t.dtype) for t in last.ft)
        written: list[str] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="ckptdiff-sha256")
        try:
            with byte_progress(total, "applying", progress) as on_bytes:
                for fname, tensors in plan.items():
                    f = out_file.open() if out_file is not None else folder.open(fname)  # type: ignore[union-attr]
                    meta = last.metadata.get(fname) or (next(iter(last.metadata.values()), None) if single else None)
                    writer = StreamWriter(f, [Planned(t.name, t.dtype, t.shape) for t in tensors], meta)
                    for t, made in rb.tensors([t.name for t in tensors]):
                        raw = _raw(made)
                        digest = pool.submit(_sha256_raw, raw)  # hashed while written: both release the GIL
                        writer.write(raw)
                        rb.check(t, digest.result())
                        on_bytes(t.numel * _itemsize(t.dtype))
                    writer.close()
                    if out_file is not None:
                        out_file.finish()
                    written.append(fname)
            if folder is not None:
                if len(plan) > 1:
                    index = {
                        "metadata": {"total_size": total},
                        "weight_map": {t.name: fname for fname, ts in plan.items() for t in ts},
                    }
                    folder.open("model.safetensors.index.json").write(json.dumps(index, indent=2).encode() + b"\n")
                    written.append("model.safetensors.index.json")
                folder.commit()
        except BaseException:
            if folder is not None:
                folder.discard()
            if out_file is not None:
                out_file.discard()
            raise
        finally:
            pool.shutdown()
    return ApplyResult(target, written, len(last.ft), total)


@dataclass(frozen=True)
class VerifyResult:
    """Whether applying the patches to the base gives the fine-tune bit for bit, and the first tensor that does not."""

    same: bool
    tensors: int
    first: str = ""  # the first tensor that differs, or "" when none
    why: str = ""


def patch_verify(
    base: SourceLike,
    patches: Sequence[str | os.PathLike[str]],
    ft: SourceLike,
    *,
    progress: bool = True,
) -> VerifyResult:
    """Apply ``patches`` to ``base`` in memory tensor by tensor, and compare with ``ft`` as stored; no file written."""
    if not patches:
        raise InputError("patch verify needs a PATCH; give the patch files in the order they were made")
    with _opened(base, patches, progress) as rb:
        target = resolve.open(ft, stored=True, progress=progress)
        try:
            want = {t.name: t for t in rb.last.ft}
            for name in target.infos:
                if name not in want:
                    return VerifyResult(
                        False, len(want), name, f"{ft} has tensor {name!r}, which the patch does not make"
                    )
            total = sum(t.numel * _itemsize(t.dtype) for t in want.values())
            with byte_progress(total, "verifying", progress) as on_bytes:
                for name, t in want.items():
                    info = target.infos.get(name)
                    if info is None:
                        return VerifyResult(
                            False, len(want), name, f"{ft} lacks tensor {name!r}, which the patch makes"
                        )
                    if info.dtype.name != t.dtype or info.shape != t.shape:
                        why = f"{info.dtype.name}{list(info.shape)} in {ft}, {t.dtype}{list(t.shape)} from the patch"
                        return VerifyResult(False, len(want), name, why)
                for t, made in rb.tensors(list(want)):
                    rb.check(t, sha256_hex(made))
                    if _hash_source(target, target.infos[t.name]) != t.sha256:
                        return VerifyResult(False, len(want), t.name, "its stored bytes differ")
                    on_bytes(t.numel * _itemsize(t.dtype))
        finally:
            if not isinstance(ft, Source):
                target.close()
    return VerifyResult(True, len(want))
