"""Safetensors files (one, several, or the shards of an index) read with positioned reads.

The header is parsed and validated up front by :mod:`ckptdiff.io.formats.safetensors_header` (exactly the rules of
the ``safetensors`` library); tensor data is read with ``pread`` into caller buffers, never memory-mapped, so
anonymous memory stays bounded and a file truncated while it is read fails with a message instead of SIGBUS.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.formats import safetensors_header as st_header
from ckptdiff.io.source import Source, TensorInfo

MAX_HEADER_BYTES = st_header.MAX_HEADER_BYTES


@dataclass(frozen=True)
class _Span:
    path: str
    offset: int  # absolute byte offset of the tensor data in the file


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str]]:
    """Parse and validate one safetensors header: infos, absolute data offsets, and ``__metadata__``.

    Every check that can be made without reading tensor data is made here, so a truncated or corrupt
    file fails before any work starts. The header rules are exactly those of the ``safetensors`` library
    (see :mod:`ckptdiff.io.formats.safetensors_header`).
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


class SafetensorsSource(Source):
    """One or more safetensors files read with positioned reads (no mmap: anonymous memory stays bounded)."""

    def __init__(self, spec: str, files: list[Path], resolved: str, expected: dict[str, str] | None = None):
        super().__init__(spec, resolved)
        self._spans: dict[str, _Span] = {}
        self._fds: dict[str, int] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.metadata: dict[str, dict[str, str]] = {}  # each file's ``__metadata__``, by path
        for path in files:
            infos, offsets, meta, identity = _read_safetensors_header(path)
            self._identity[str(path)] = identity
            self.metadata[str(path)] = meta
            for name, info in infos.items():
                if name in self.infos:
                    raise InputError(
                        f"tensor {name!r} appears in both {self.infos[name].file} and {path}; "
                        "keep one copy or add a model.safetensors.index.json"
                    )
                self.infos[name] = info
                self._spans[name] = _Span(str(path), offsets[name])
        self._check_index(expected)

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
        what = f"safetensors file {span.path}"
        fileio.read_tensor_bytes(self._fd(span.path), buf, span.offset + start * size, what, name)
        return fileio.as_dtype(buf, info.dtype.torch)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
