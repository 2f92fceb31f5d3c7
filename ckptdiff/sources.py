"""Checkpoint sources: turn what a user typed into a lazy, named collection of tensors.

A source knows every tensor's name, dtype and shape from headers alone, and reads one tensor, or one
flat range of a tensor, on demand. Nothing is loaded up front, so memory does not grow with model size.

Supported inputs: a ``.safetensors`` file; a directory with ``model.safetensors`` or a sharded set with
``model.safetensors.index.json``; a PyTorch ``.bin``/``.pt`` state dict (weights-only, memory-mapped);
a Hugging Face Hub id ``org/name[@revision]`` (see :mod:`ckptdiff.hub`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.dtypes import DType
from ckptdiff.errors import InputError

MAX_HEADER_BYTES = 100 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


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


@dataclass
class Source(ABC):
    """A lazy checkpoint: tensor metadata up front, data on demand."""

    spec: str  # what the user typed
    resolved: str  # what it resolved to (paths, hub revision)
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    @abstractmethod
    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        """Entries [start, start+count) of tensor ``name``, flattened, on the CPU, in its stored dtype.

        ``out``, a uint8 buffer large enough for the bytes, is filled and viewed instead of allocating:
        reusing buffers avoids the page faults of fresh memory, which cost more than the read itself.
        Sources that need no copy (memory-mapped pickles) ignore it.
        """

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in its stored shape."""
        return self.read(name).reshape(self.infos[name].shape)

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release file handles."""

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(i.nbytes for i in self.infos.values())


# ---------------------------------------------------------------------------------------------
# safetensors


@dataclass(frozen=True)
class _Span:
    path: str
    offset: int  # absolute byte offset of the tensor data in the file


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str]]:
    """Parse and validate one safetensors header: infos, absolute data offsets, and ``__metadata__``.

    Every check that can be made without reading tensor data is made here, so a truncated or corrupt
    file fails before any work starts.
    """
    what = f"safetensors file {path}"
    fix = "re-download or re-save it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{what} is truncated (shorter than its 8-byte header length); {fix}")
            hlen = int.from_bytes(head, "little")
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise InputError(f"{what} is corrupt or truncated (header length {hlen} exceeds the file); {fix}")
            raw = f.read(hlen)
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}; check the path and permissions") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{what} has a corrupt header (not valid JSON); {fix}") from None
    if not isinstance(header, dict):
        raise InputError(f"{what} has a corrupt header (not a JSON object); {fix}")
    data_start = 8 + hlen
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for name, entry in header.items():
        try:
            dt = dtypes.from_name(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{what} has a malformed header entry for tensor {name!r}; {fix}") from None
        if dt is None:
            raise InputError(f"{what}: tensor {name!r} has dtype {entry['dtype']!r}, which ckptdiff does not support")
        info = TensorInfo(name, dt, shape, str(path))
        if end - begin != info.nbytes or begin < 0:
            raise InputError(f"{what}: tensor {name!r} has data offsets that disagree with its shape; {fix}")
        if data_start + end > size:
            raise InputError(
                f"{what} is truncated: tensor {name!r} ends at byte {data_start + end} of {size}; {fix}"
            )
        infos[name] = info
        offsets[name] = data_start + begin
    return infos, offsets, {str(k): str(v) for k, v in meta.items()}


class SafetensorsSource(Source):
    """One or more safetensors files read with positioned reads (no mmap: anonymous memory stays bounded)."""

    def __init__(self, spec: str, files: list[Path], resolved: str, expected: dict[str, str] | None = None):
        super().__init__(spec, resolved)
        self._spans: dict[str, _Span] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        for path in files:
            infos, offsets, _ = read_safetensors_header(path)
            for name, info in infos.items():
                if name in self.infos:
                    raise InputError(
                        f"tensor {name!r} appears in both {self.infos[name].file} and {path}; "
                        "keep one copy or add a model.safetensors.index.json"
                    )
                self.infos[name] = info
                self._spans[name] = _Span(str(path), offsets[name])
        if expected is not None:
            for name, shard in expected.items():
                if name not in self.infos:
                    raise InputError(
                        f"index for {spec} says tensor {name!r} is in {shard}, but that shard does not hold it; "
                        "the checkpoint is incomplete: re-download it"
                    )

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        info = self.infos[name]
        n = info.numel - start if count is None else count
        size = info.dtype.itemsize
        buf = np.empty(n * size, dtype=np.uint8) if out is None else out[: n * size]
        span = self._spans[name]
        fd = self._fd(span.path)
        pos = span.offset + start * size
        view = memoryview(buf)  # type: ignore[arg-type]
        done = 0
        while done < len(buf):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise InputError(f"safetensors file {span.path} ended early while reading {name!r}; re-download it")
            done += got
        return torch.from_numpy(buf).view(info.dtype.torch)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------------------------------------
# PyTorch pickles


class TorchFileSource(Source):
    """A ``.bin``/``.pt`` state dict (or several shards), loaded weights-only and memory-mapped."""

    def __init__(self, spec: str, files: list[Path], resolved: str):
        super().__init__(spec, resolved)
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            for name, t in _load_torch_file(path).items():
                if name in self._tensors:
                    raise InputError(f"tensor {name!r} appears twice in the shards of {spec}; re-save the checkpoint")
                dt = dtypes.from_torch(t.dtype)
                if dt is None:
                    raise InputError(f"{path}: tensor {name!r} has dtype {t.dtype}, which ckptdiff does not support")
                self._tensors[name] = t
                self.infos[name] = TensorInfo(name, dt, tuple(t.shape), str(path))

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        flat = self._tensors[name].reshape(-1)
        end = flat.numel() if count is None else start + count
        return flat[start:end]


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True and mmap=True; unwrap ``{"state_dict": ...}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path} is not a weights-only PyTorch checkpoint (it pickles code or objects, which ckptdiff refuses "
            f"to execute): {str(e).splitlines()[0]}; convert it to safetensors from a trusted environment"
        ) from None
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "mmap" in msg or "zipfile" in msg or "zip archive" in msg:
            raise InputError(
                f"{path} uses PyTorch's legacy (non-zip) format, which cannot be memory-mapped; "
                "re-save it with torch.save or convert it to safetensors"
            ) from None
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({msg}); check the file") from None
    except (EOFError, OSError, ValueError) as e:
        msg = f"{path} is not a readable PyTorch checkpoint ({e}); check the file or re-download it"
        raise InputError(msg) from None
    for key in ("state_dict", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out and obj:
        raise InputError(f"{path} holds no tensors at its top level; pass a state dict")
    return out


# ---------------------------------------------------------------------------------------------
# resolution


def _index_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shards named by a ``*.index.json`` and its weight map; every shard must exist inside the index's folder.

    One function for every reader (full reads, ``check --header-only``, the output checks): see
    :mod:`ckptdiff.shards` for the containment rule and why it is lexical.
    """
    from ckptdiff.shards import read_index

    return read_index(index)


def _from_directory(spec: str, d: Path, resolved_prefix: str = "") -> Source:
    """Pick the checkpoint inside a directory, preferring safetensors."""
    prefix = resolved_prefix or str(d)
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        shards, wmap = _index_files(idx)
        return SafetensorsSource(spec, shards, f"{prefix} ({len(shards)} safetensors shards)", wmap)
    single = d / "model.safetensors"
    if single.is_file():
        return SafetensorsSource(spec, [single], f"{prefix}/model.safetensors")
    found = sorted(d.glob("*.safetensors"))
    if found:
        return SafetensorsSource(spec, found, f"{prefix} ({len(found)} safetensors files)")
    bidx = d / "pytorch_model.bin.index.json"
    if bidx.is_file():
        shards, _ = _index_files(bidx)
        return TorchFileSource(spec, shards, f"{prefix} ({len(shards)} .bin shards)")
    pickles = sorted([*d.glob("*.bin"), *d.glob("*.pt"), *d.glob("*.pth")])
    if len(pickles) == 1:
        return TorchFileSource(spec, pickles, str(pickles[0]))
    if pickles:
        raise InputError(
            f"directory {d} holds several PyTorch files and no pytorch_model.bin.index.json; pass one file"
        )
    raise InputError(f"directory {d} holds no checkpoint (.safetensors, index.json, .bin or .pt); check the path")


def resolve(spec: str, *, progress: bool = True) -> Source:
    """Turn a path or Hub id into a lazy :class:`Source`; raise :class:`InputError` on anything unusable."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _from_directory(spec, path)
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return SafetensorsSource(spec, [path], str(path.resolve()))
        if path.name.endswith(".index.json"):
            shards, wmap = _index_files(path)
            if path.name.endswith(".safetensors.index.json"):
                return SafetensorsSource(spec, shards, f"{path} ({len(shards)} shards)", wmap)
            return TorchFileSource(spec, shards, f"{path} ({len(shards)} shards)")
        if suffix in (".bin", ".pt", ".pth"):
            return TorchFileSource(spec, [path], str(path.resolve()))
        raise InputError(
            f"{spec} is not a checkpoint ckptdiff can read; pass a .safetensors, .bin/.pt file, a directory or a Hub id"
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        from ckptdiff import hub

        folder, resolved = hub.download(spec, progress=progress)
        return _from_directory(spec, folder, resolved)
    raise InputError(
        f"{spec} does not exist; pass a checkpoint file, a directory, or a Hub id like org/name[@revision]"
    )
