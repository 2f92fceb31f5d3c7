"""``patch apply`` and ``patch verify``: a patch read back, checked, and applied to its base tensor by tensor."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.analyses.patch.common import (
    BASE_KEY,
    FORMAT,
    FORMAT_VERSION,
    FT_KEY,
    SINGLE,
    hash_stored,
    itemsize_of,
    raw_bytes,
    sha256_hex,
    sha256_raw,
)
from ckptdiff.engine.reader import prefetch
from ckptdiff.errors import InputError
from ckptdiff.io import resolve
from ckptdiff.io.files import parse_json
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.formats.safetensors_writer import Planned, StreamWriter
from ckptdiff.io.outputs import OutputFolder, standalone
from ckptdiff.io.resolve import SourceLike
from ckptdiff.io.source import Source
from ckptdiff.metrics.patch import (
    Encoding,
    index_itemsize,
    stored_bits,
)
from ckptdiff.runtime.progress import byte_progress

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


def _count(value: object) -> int:
    """A count or a dimension of the metadata: a JSON integer >= 0 (not a bool, not a float), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"shape {value!r} is not a list")
    return tuple(_count(d) for d in value)


def _layout(value: object) -> tuple[str, tuple[int, ...]]:
    """A base layout entry, ``[dtype, shape]``."""
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"layout {value!r} is not [dtype, shape]")
    return str(value[0]), _shape(value[1])


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
        fix = "re-create the patch"
        try:  # parse_json refuses nesting deeper than any patch has, before the parser would recurse
            base = parse_json(meta[BASE_KEY].encode(), f"patch {self.path}: metadata {BASE_KEY}", fix)
            ft = parse_json(meta[FT_KEY].encode(), f"patch {self.path}: metadata {FT_KEY}", fix)
            self.base_source = str(base["source"])
            self.base: dict[str, str] = {str(k): str(v) for k, v in base["tensors"].items()}
            self.base_layout: dict[str, tuple[str, tuple[int, ...]]] = {
                str(k): _layout(v) for k, v in base["layout"].items()
            }
            self.ft_source = str(ft["source"])
            self.ft = [
                FtTensor(
                    str(t["name"]),
                    str(t["dtype"]),
                    _shape(t["shape"]),
                    str(t["sha256"]),
                    t["encoding"],
                    _count(t["changed"]),
                )
                for t in ft["tensors"]
            ]
            self.shards: dict[str, str] = {str(k): str(v) for k, v in ft["shards"].items()}
            self.metadata: dict[str, dict[str, str]] = {
                str(k): {str(a): str(b) for a, b in v.items()} for k, v in ft["metadata"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(
                f"patch {self.path} has damaged metadata ({type(e).__name__}: {str(e)[:200]}); re-create the patch"
            ) from None
        self.by_name = {t.name: t for t in self.ft}
        if len(self.by_name) != len(self.ft):
            twice = next(t.name for i, t in enumerate(self.ft) if t.name in {u.name for u in self.ft[:i]})
            raise InputError(f"patch {self.path} is damaged: it lists tensor {twice!r} twice; re-create the patch")
        for shard in self.shards.values():
            if Path(shard).name != shard or not shard.endswith(".safetensors") or shard.startswith("."):
                raise InputError(
                    f"patch {self.path} is damaged: it names shard file {shard!r}, which is not a plain "
                    "NAME.safetensors file name; re-create the patch"
                )
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
                f"patch {self.path} is damaged: tensor {t.name!r} has encoding {t.encoding!r}, dtype {t.dtype}; "
                "re-create the patch"
            )
        if t.encoding != "dense" and t.name not in self.base:
            raise InputError(
                f"patch {self.path} is damaged: it patches tensor {t.name!r}, which its base lacks; re-create the patch"
            )
        was = self.base_layout.get(t.name)
        if t.encoding != "dense" and was is not None and was != (t.dtype, t.shape):  # else it is carried whole
            raise InputError(
                f"patch {self.path} is damaged: its tensor {t.name!r} is {t.dtype}{list(t.shape)} but not carried "
                f"whole, and its base's is {was[0]}{list(was[1])}; re-create the patch"
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
    """The base's tensors are those the first patch was made against (names, dtypes and shapes, from headers), else
    exit 2; their bytes are checked by hash as they are read."""
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
    for name, info in base.infos.items():  # dtypes and shapes, from headers: before anything is read or written
        want = first.base_layout.get(name)
        if want is not None and (info.dtype.name, info.shape) != want:
            raise InputError(
                f"{base.spec} is not the base of patch {first.path}: its tensor {name!r} is "
                f"{info.dtype.name}{list(info.shape)}, the patch's base had {want[0]}{list(want[1])}; give the "
                f"checkpoint the patch was made from ({first.base_source})"
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
        total = sum(t.numel * itemsize_of(t.dtype) for t in last.ft)
        written: list[str] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="ckptdiff-sha256")
        try:
            with byte_progress(total, "applying", progress) as on_bytes:
                for fname, tensors in plan.items():
                    f = out_file.open() if out_file is not None else folder.open(fname)  # type: ignore[union-attr]
                    meta = last.metadata.get(fname) or (next(iter(last.metadata.values()), None) if single else None)
                    writer = StreamWriter(f, [Planned(t.name, t.dtype, t.shape) for t in tensors], meta)
                    for t, made in rb.tensors([t.name for t in tensors]):
                        raw = raw_bytes(made)
                        digest = pool.submit(sha256_raw, raw)  # hashed while written: both release the GIL
                        writer.write(raw)
                        rb.check(t, digest.result())
                        on_bytes(t.numel * itemsize_of(t.dtype))
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
            total = sum(t.numel * itemsize_of(t.dtype) for t in want.values())
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
                    if hash_stored(target, target.infos[t.name]) != t.sha256:
                        return VerifyResult(False, len(want), t.name, "its stored bytes differ")
                    on_bytes(t.numel * itemsize_of(t.dtype))
        finally:
            if not isinstance(ft, Source):
                target.close()
    return VerifyResult(True, len(want))
