"""What creating and applying a patch share: the format's names and keys, hashes of stored bytes, scratch
files, and where the fine-tune came from (its Hub commit, its files)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io.formats.safetensors import SafetensorsSource
from ckptdiff.io.source import Source, TensorInfo

FORMAT = "ckptdiff.patch"  # metadata key: the format version
FORMAT_VERSION = "1"
BASE_KEY = "ckptdiff.base"  # metadata key: JSON {"source", "tensors": {name: sha256}}
FT_KEY = "ckptdiff.ft"  # metadata key: JSON {"source", "tensors": [...], "shards": {...}, "metadata": {...}}
INDEX_NP = {4: np.int32, 8: np.int64}
PIECE = 16 * 1024 * 1024  # bytes per read or copy while streaming
SINGLE = "model.safetensors"
PATCH_INDEX = "model.safetensors.index.json"  # a sharded patch is a folder, read like a sharded checkpoint


def sha256_hex(t: torch.Tensor) -> str:
    """sha256 of a tensor's stored bytes (row-major), as hex."""
    return sha256_raw(raw_bytes(t))


def sha256_raw(raw: memoryview) -> str:
    return hashlib.sha256(raw).hexdigest()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's stored bytes, flat (no copy when contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


class Scratch:
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


def itemsize_of(dtype: str) -> int:
    found = dtypes.from_name(dtype)
    return found.itemsize if found is not None else 1


def hash_stored(src: Source, info: TensorInfo) -> str:
    """sha256 of one stored tensor, read in pieces."""
    return copy_stored(src, info, None)


def copy_stored(src: Source, info: TensorInfo, scratch: Scratch | None) -> str:
    """Stream one stored tensor into the values scratch file (when given); its sha256."""
    h = hashlib.sha256()
    step = max(1, PIECE // info.dtype.itemsize)
    for at in range(0, info.numel, step):
        raw = raw_bytes(src.read(info.name, at, min(step, info.numel - at)))
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
