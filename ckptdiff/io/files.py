"""Opening and reading checkpoint files defensively: regular files only, positioned reads, no mmap.

A named pipe given as a checkpoint would block ``open`` forever and a device would never end, so files are
opened non-blocking and refused unless they are regular. Reads are ``preadv`` into caller-owned buffers: a
file truncated while it is read gives a short read (an :class:`~ckptdiff.errors.InputError`), where a memory
map would kill the process with SIGBUS.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import torch

from ckptdiff.errors import InputError

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def open_regular(path: Path | str, what: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor for ``path`` and its stat; :class:`InputError` unless it is a regular file.

    ``what`` names the file in messages ("safetensors file x.safetensors").
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as e:
        raise InputError(f"cannot open {what}: {e.strerror}; check the path and permissions") from None
    except ValueError:
        raise InputError(f"cannot open {what}: the path contains a NUL byte") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what} is {kind(st.st_mode)}, not a regular file; pass a checkpoint file")
    return fd, st


def reopen(path: Path | str, what: str, identity: tuple[int, int]) -> int:
    """Open ``path`` again for data reads; :class:`InputError` if it is no longer the file first opened."""
    fd, st = open_regular(path, what)
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        raise InputError(f"{what} was replaced while ckptdiff was reading it; rerun once it is no longer written")
    return fd


def pread_into(fd: int, view: memoryview, pos: int) -> int:
    """Fill ``view`` from byte ``pos`` of ``fd``; the number of bytes read, short only at the end of the file."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], pos + done)
        except InterruptedError:  # pragma: no cover - retried by Python itself since PEP 475
            continue
        if got <= 0:
            break
        done += got
    return done


def pread_bytes(fd: int, n: int, pos: int) -> bytes:
    """Up to ``n`` bytes from byte ``pos`` (fewer only at the end of the file)."""
    buf = bytearray(n)
    got = pread_into(fd, memoryview(buf), pos)
    return bytes(buf[:got])


def read_tensor_bytes(fd: int, buf: np.ndarray, pos: int, what: str, name: str) -> None:
    """Fill ``buf`` from byte ``pos``: a short read means the file shrank after its header was checked."""
    try:
        got = pread_into(fd, memoryview(buf), pos)  # type: ignore[arg-type]
    except OSError as e:
        raise InputError(f"cannot read tensor {name!r} from {what}: {e.strerror}; check the file") from None
    if got < len(buf):
        raise InputError(
            f"{what} ended early while reading tensor {name!r} (was it truncated or rewritten while ckptdiff "
            "read it?); rerun on a complete file"
        )


def as_dtype(buf: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``buf``'s bytes viewed as a flat tensor of ``dtype`` (no copy)."""
    if buf.size == 0:  # an empty numpy buffer has a zero stride, which torch cannot view as another dtype
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(buf).view(dtype)
