"""Checkpoint sources: turn what a user typed into a lazy, named collection of tensors.

A source knows every tensor's name, dtype and shape from headers alone, and reads one tensor, or one
flat range of a tensor, on demand. Nothing is loaded up front, so memory does not grow with model size.

Supported inputs: a ``.safetensors`` file; a directory with ``model.safetensors`` or a sharded set with
``model.safetensors.index.json``; a PyTorch ``.bin``/``.pt`` state dict (weights-only, positioned reads);
a Hugging Face Hub id ``org/name[@revision]`` (see :mod:`ckptdiff.hub`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptdiff import dtypes, fileio, torch_archive
from ckptdiff import safetensors_header as st_header
from ckptdiff.dtypes import DType
from ckptdiff.errors import InputError
from ckptdiff.naming import is_input_embedding, natural_key

MAX_HEADER_BYTES = st_header.MAX_HEADER_BYTES
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


@dataclass(frozen=True)
class Tie:
    """A name that holds no data of its own in a checkpoint: it is tensor ``to`` (see :mod:`ckptdiff.ties`)."""

    to: str  # the tensor it is, kept in ``Source.infos``
    why: str  # how it is known: "shared storage", "config.json tie_word_embeddings"


SHARED_STORAGE = "shared storage"


@dataclass
class Source(ABC):
    """A lazy checkpoint: tensor metadata up front, data on demand.

    ``infos`` holds each tensor once: a name that is another tensor (a tied output embedding) is not in it but in
    ``tied``, so totals count its data once and alignment compares it under the name kept.
    """

    spec: str  # what the user typed
    resolved: str  # what it resolved to (paths, hub revision)
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    tied: dict[str, Tie] = field(default_factory=dict)  # alias name -> the tensor it is

    @abstractmethod
    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        """Entries [start, start+count) of tensor ``name``, flattened, on the CPU, in its stored dtype.

        ``out``, a uint8 buffer large enough for the bytes, is filled and viewed instead of allocating:
        reusing buffers avoids the page faults of fresh memory, which cost more than the read itself.
        Sources that must gather a non-contiguous view allocate instead.
        """

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in its stored shape."""
        return self.read(name).reshape(self.infos[name].shape)

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release file handles."""

    def remote_config(self) -> tuple[str, bytes] | None:
        """The checkpoint's ``config.json`` as (where, bytes) when its files are not on this machine (a streamed
        Hub repo fetches it); None for a local checkpoint, whose config sits beside the weights
        (:mod:`ckptdiff.model_config` looks there)."""
        return None

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
    file fails before any work starts. The header rules are exactly those of the ``safetensors`` library
    (see :mod:`ckptdiff.safetensors_header`).
    """
    infos, offsets, meta, _ = _read_safetensors_header(path)
    return infos, offsets, meta


def _read_safetensors_header(
    path: Path,
) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str], tuple[int, int]]:
    """:func:`read_safetensors_header`, plus the file's (device, inode) so later reads can check it is the same."""
    what = f"safetensors file {path}"
    fd, st = fileio.open_regular(path, what)
    try:
        size = st.st_size
        try:
            head = fileio.pread_bytes(fd, 8, 0)
            if len(head) < 8:
                raise InputError(f"{what} is truncated (shorter than its 8-byte header length); {st_header.FIX}")
            hlen = int.from_bytes(head, "little")
            st_header.check_length(hlen, size)
            raw = fileio.pread_bytes(fd, hlen, 8)
        except OSError as e:
            raise InputError(f"cannot read {what}: {e.strerror}; check the file") from None
        if len(raw) < hlen:
            raise InputError(f"{what} is truncated (it ends inside its header); {st_header.FIX}")
        header = st_header.parse(raw, size - 8 - hlen)
    except st_header.HeaderProblem as p:
        raise InputError(f"{what} {p.reason}; {p.fix}") from None
    finally:
        os.close(fd)
    infos, offsets = header_infos(header, 8 + hlen, what, str(path))
    return infos, offsets, header.metadata, (st.st_dev, st.st_ino)


def header_infos(
    header: st_header.Header, data_start: int, what: str, file: str
) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """TensorInfo records and absolute data offsets from a validated header (local files and Hub streams alike)."""
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for entry in header.entries:
        dt = dtypes.from_name(entry.dtype)
        if dt is None:
            supported = ", ".join(dtypes.BY_NAME)
            raise InputError(
                f"{what}: tensor {entry.name!r} has dtype {entry.dtype!r}, which ckptdiff does not support "
                f"(it compares {supported})"
            )
        if entry.shape and max(entry.shape) > st_header.I64_MAX:
            raise InputError(
                f"{what}: tensor {entry.name!r} has shape {list(entry.shape)}, with a dimension of 2^63 or more, which "
                f"PyTorch cannot represent; {st_header.FIX}"
            )
        infos[entry.name] = TensorInfo(entry.name, dt, entry.shape, file)
        offsets[entry.name] = data_start + entry.begin
    return infos, offsets


def _read_at(fd: int, buf: np.ndarray, pos: int, what: str, name: str) -> None:
    """Fill ``buf`` from byte ``pos``: a short read means the file shrank after its header was checked."""
    try:
        got = fileio.pread_into(fd, memoryview(buf), pos)  # type: ignore[arg-type]
    except OSError as e:
        raise InputError(f"cannot read tensor {name!r} from {what}: {e.strerror}; check the file") from None
    if got < len(buf):
        raise InputError(
            f"{what} ended early while reading tensor {name!r} (was it truncated or rewritten while ckptdiff "
            "read it?); rerun on a complete file"
        )


def _as_dtype(buf: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if buf.size == 0:  # an empty numpy buffer has a zero stride, which torch cannot view as another dtype
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)


class SafetensorsSource(Source):
    """One or more safetensors files read with positioned reads (no mmap: anonymous memory stays bounded)."""

    def __init__(self, spec: str, files: list[Path], resolved: str, expected: dict[str, str] | None = None):
        super().__init__(spec, resolved)
        self._spans: dict[str, _Span] = {}
        self._fds: dict[str, int] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        for path in files:
            infos, offsets, _, identity = _read_safetensors_header(path)
            self._identity[str(path)] = identity
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
                fd = fileio.reopen(path, f"safetensors file {path}", self._identity[path])
                self._fds[path] = fd
            return fd

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        info = self.infos[name]
        n = info.numel - start if count is None else count
        size = info.dtype.itemsize
        buf = np.empty(n * size, dtype=np.uint8) if out is None else out[: n * size]
        span = self._spans[name]
        _read_at(self._fd(span.path), buf, span.offset + start * size, f"safetensors file {span.path}", name)
        return _as_dtype(buf, info.dtype.torch)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------------------------------------
# PyTorch pickles


class TorchFileSource(Source):
    """A ``.bin``/``.pt`` state dict (or several shards): unpickled weights-only, data read with positioned reads.

    Nothing but the pickle is read up front (see :mod:`ckptdiff.torch_archive`); no mmap, so a file truncated
    while it is read fails with a message instead of SIGBUS.
    """

    def __init__(self, spec: str, files: list[Path], resolved: str):
        super().__init__(spec, resolved)
        self._stored: dict[str, torch_archive.StoredTensor] = {}
        self._paths: dict[str, str] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._strided: tuple[str, torch.Tensor] | None = None  # the last non-contiguous tensor, flattened
        for path in files:
            stored, identity = _load_torch_file(path)
            self._identity[str(path)] = identity
            for name, t in stored.items():
                if name in self._stored:
                    raise InputError(f"tensor {name!r} appears twice in the shards of {spec}; re-save the checkpoint")
                dt = dtypes.from_torch(t.dtype)
                if dt is None:
                    raise InputError(f"{path}: tensor {name!r} has dtype {t.dtype}, which ckptdiff does not support")
                self._stored[name] = t
                self._paths[name] = str(path)
                self.infos[name] = TensorInfo(name, dt, t.shape, str(path))
            for alias, kept in _aliases(stored).items():
                del self.infos[alias]
                self.tied[alias] = Tie(kept, SHARED_STORAGE)

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = fileio.reopen(path, f"PyTorch file {path}", self._identity[path])
                self._fds[path] = fd
            return fd

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        info = self.infos[name]
        t = self._stored[name]
        n = info.numel - start if count is None else count
        if not t.contiguous:
            return self._flat(name)[start : start + n]
        size = info.dtype.itemsize
        buf = np.empty(n * size, dtype=np.uint8) if out is None else out[: n * size]
        path = self._paths[name]
        _read_at(self._fd(path), buf, t.storage_pos + (t.offset + start) * size, f"PyTorch file {path}", name)
        return _as_dtype(buf, info.dtype.torch)

    def _flat(self, name: str) -> torch.Tensor:
        """A non-contiguous view (a transpose, a strided slice) in row-major order; the last one is kept."""
        with self._lock:
            if self._strided is not None and self._strided[0] == name:
                return self._strided[1]
        t = self._stored[name]
        dtype = self.infos[name].dtype
        first, end = t.span
        buf = np.empty((end - first) * dtype.itemsize, dtype=np.uint8)
        path = self._paths[name]
        _read_at(self._fd(path), buf, t.storage_pos + first * dtype.itemsize, f"PyTorch file {path}", name)
        flat = _as_dtype(buf, dtype.torch).as_strided(t.shape, t.stride, t.offset - first).reshape(-1)
        with self._lock:
            self._strided = (name, flat)
        return flat

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._strided = None


def _aliases(stored: dict[str, torch_archive.StoredTensor]) -> dict[str, str]:
    """Names that are another name's tensor: the same storage, offset, shape, stride and dtype (``torch.save`` of a
    model whose ``lm_head`` is its ``embed_tokens``), each mapped to the name kept: an input embedding, else the
    first in natural order. Views that overlap only in part are different tensors and stay."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in stored.items():
        groups.setdefault((t.storage_pos, t.offset, t.shape, t.stride, t.dtype), []).append(name)
    out: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            kept = min(names, key=lambda n: (not is_input_embedding(n), natural_key(n)))
            out.update((n, kept) for n in names if n != kept)
    return out


def _load_torch_file(path: Path) -> tuple[dict[str, torch_archive.StoredTensor], tuple[int, int]]:
    """Where every tensor of a ``torch.save`` state dict lies in ``path``, validated (no data read).

    Unwraps ``{"state_dict": ...}``; also returns the file's (device, inode) so later reads can check that
    they read the file that was validated.
    """
    fd, st = fileio.open_regular(path, f"PyTorch file {path}")
    try:
        return torch_archive.read_archive(path, fd, st.st_size), (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


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
    if idx.exists():  # not is_file(): an index that is a pipe or a folder is refused when read, not skipped
        shards, wmap = _index_files(idx)
        return SafetensorsSource(spec, shards, f"{prefix} ({len(shards)} safetensors shards)", wmap)
    single = d / "model.safetensors"
    if single.is_file():
        return SafetensorsSource(spec, [single], f"{prefix}/model.safetensors")
    found = sorted(d.glob("*.safetensors"))
    if found:
        return SafetensorsSource(spec, found, f"{prefix} ({len(found)} safetensors files)")
    bidx = d / "pytorch_model.bin.index.json"
    if bidx.exists():
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


def stat_input(spec: str) -> os.stat_result | None:
    """What the local path ``spec`` names, or None if nothing; :class:`InputError` if it cannot be a checkpoint.

    Checked before anything is opened: a symbolic-link loop, a dangling link, a path that cannot be accessed,
    and anything but a regular file or a folder (a named pipe would block ``open`` forever, a device never end).
    """
    path = Path(spec).expanduser()
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if path.is_symlink():
            raise InputError(f"{spec} is a symbolic link to a path that does not exist; fix the link") from None
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(
                f"{spec} is a symbolic link loop (following it never reaches a file); fix or remove the link"
            ) from None
        raise fileio.os_error(f"cannot access {spec}", e) from None
    except ValueError:  # an embedded NUL byte
        raise InputError(f"{spec!r} is not a valid path (it contains a NUL byte)") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InputError(
            f"{spec} is {fileio.kind(st.st_mode)}, not a checkpoint file or folder; pass a regular file, a folder "
            "or a Hub id"
        )
    return st


def resolve(spec: str, *, progress: bool = True, stream: bool | None = None) -> Source:
    """Turn a path or Hub id into a lazy :class:`Source`; raise :class:`InputError` on anything unusable.

    ``stream`` (Hub ids only): read tensors by byte range over HTTP instead of downloading the repo
    (:mod:`ckptdiff.hub_stream`); ``None`` follows the environment variable ``CKPTDIFF_HUB_STREAM``.
    """
    path = Path(spec).expanduser()
    found = stat_input(spec)
    if found is not None:
        if stat.S_ISDIR(found.st_mode):
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

        hub.refuse_path_like(spec)
        if hub.stream_wanted(stream):
            from ckptdiff.hub_stream import HubStreamSource

            return HubStreamSource.open(spec)
        folder, resolved = hub.download(spec, progress=progress)
        return _from_directory(spec, folder, resolved)
    raise InputError(
        f"{spec} does not exist; pass a checkpoint file, a directory, or a Hub id like org/name[@revision]"
    )
