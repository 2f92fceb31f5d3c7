"""PyTorch ``.bin``/``.pt``/``.pth`` state dicts: unpickled weights-only, tensor data read with positioned reads.

:mod:`ckptdiff.io.formats.torch_archive` validates the zip archive and its pickle without running any code from it;
this module turns what it found into a :class:`~ckptdiff.io.source.Source`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io import files as fileio
from ckptdiff.io.formats import torch_archive
from ckptdiff.io.source import SHARED_STORAGE, Source, TensorInfo, Tie
from ckptdiff.naming import is_input_embedding, natural_key


class TorchFileSource(Source):
    """A ``.bin``/``.pt`` state dict (or several shards): unpickled weights-only, data read with positioned reads.

    Nothing but the pickle is read up front (see :mod:`ckptdiff.io.formats.torch_archive`); no mmap, so a file truncated
    while it is read fails with a message instead of SIGBUS.
    """

    def __init__(self, spec: str, files: list[Path], resolved: str, expected: dict[str, str] | None = None):
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
        self._check_index(expected)

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
        pos = t.storage_pos + (t.offset + start) * size
        fileio.read_tensor_bytes(self._fd(path), buf, pos, f"PyTorch file {path}", name)
        return fileio.as_dtype(buf, info.dtype.torch)

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
        pos = t.storage_pos + first * dtype.itemsize
        fileio.read_tensor_bytes(self._fd(path), buf, pos, f"PyTorch file {path}", name)
        flat = fileio.as_dtype(buf, dtype.torch).as_strided(t.shape, t.stride, t.offset - first).reshape(-1)
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


