"""PyTorch ``torch.save`` files, read without running code, without loading data up front, and without mmap.

``torch.save`` writes a zip archive: ``<folder>/data.pkl`` is the pickled object, in which every storage is a
persistent id ``('storage', type, key, location, numel)``, and ``<folder>/data/<key>`` is that storage's bytes,
stored uncompressed. This module unpickles ``data.pkl`` with PyTorch's weights-only unpickler (the one
``torch.load(weights_only=True)`` uses: no code runs), giving it storages on the meta device, so nothing but
the pickle is read. Each storage's record is then looked up in the zip directory and checked before any
tensor is used: present, uncompressed, exactly as long as the storage (the rule ``torch.load`` applies when it
does not memory-map; with ``mmap=True`` it reads past a short record into whatever follows), and inside the
file. Tensor data is read later with positioned reads, as for safetensors: a file truncated while it is read
gives an error naming it, not a SIGBUS.

What cannot be read this way is refused with its own reason: empty files, legacy (pre-1.6, non-zip) and plain
pickles, truncated or corrupt archives, TorchScript archives, pickles that import code, big-endian archives,
and sparse, quantized or storage-less tensors.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptdiff.errors import InputError

FIX = "re-download it, or re-save it with torch.save"
_LEGACY = (
    "uses PyTorch's legacy (non-zip) format or is a plain pickle, which ckptdiff does not read; "
    "re-save it with torch.save (PyTorch 1.6 or later) or convert it to safetensors"
)
_QUANTIZED = {getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, n)}
_GLOBAL = re.compile(r"GLOBAL (\S+)")
_LAYOUTS = {
    getattr(torch, n): words
    for n, words in (("sparse_coo", "sparse COO"), ("sparse_csr", "sparse CSR"), ("sparse_csc", "sparse CSC"),
                     ("sparse_bsr", "sparse BSR"), ("sparse_bsc", "sparse BSC"), ("_mkldnn", "MKL-DNN"))
    if hasattr(torch, n)
}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "module")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's elements lie in the file: its storage's bytes, and the view into them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset, in elements
    storage_pos: int  # byte position of the storage's first byte in the file
    storage_nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        """Whether the elements lie in row-major order, one after another."""
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and step != expected:
                return self.numel == 0
            expected *= size
        return True

    @property
    def span(self) -> tuple[int, int]:
        """First and one-past-last element of the storage that the view touches."""
        if self.numel == 0:
            return self.offset, self.offset
        last = self.offset + sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))
        return self.offset, last + 1


class _Refused(Exception):
    """Raised while unpickling when a storage already shows the file cannot be used."""


def _clip(text: str, limit: int = 120) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _not_a_zip(path: Path, head: bytes, size: int) -> InputError:
    """Why a file that is not a zip archive is not a readable PyTorch checkpoint."""
    if size == 0:
        return InputError(f"{path} is empty (0 bytes); {FIX}")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
        return InputError(f"{path} {_LEGACY}")
    if len(head) >= 262 and head[257:262] == b"ustar":
        return InputError(
            f"{path} uses PyTorch's oldest (tar) format, which ckptdiff does not read; "
            "re-save it with torch.save or convert it to safetensors"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        return InputError(
            f"{path} is not a PyTorch checkpoint but looks like a safetensors file; rename it to .safetensors"
        )
    return InputError(
        f"{path} is not a PyTorch checkpoint: it is neither a zip archive (what torch.save writes) nor a pickle; "
        "check the path"
    )


def _record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """A small record's bytes (CRC-checked by zipfile); it must be stored uncompressed, as torch.save does."""
    _stored_plainly(info, path)
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, zipfile.LargeZipFile) as e:
        raise InputError(f"{path} is corrupt: record {info.filename} cannot be read ({_clip(str(e))}); {FIX}") from None


def _stored_plainly(info: zipfile.ZipInfo, path: Path) -> None:
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(
            f"{path} holds record {info.filename} compressed, which torch.save never does: the archive was repacked; "
            "re-save it with torch.save"
        )


def _data_position(fd: int, info: zipfile.ZipInfo, size: int, path: Path, name: str) -> int:
    """Byte position of a record's data, from its local header; the record must end inside the file."""
    try:
        local = os.pread(fd, 30, info.header_offset)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}; check the file") from None
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{path} is corrupt: record {info.filename} (tensor {name!r}) has no zip header; {FIX}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    pos = info.header_offset + 30 + name_len + extra_len
    if pos + info.file_size > size:
        raise InputError(
            f"{path} is truncated: record {info.filename} (tensor {name!r}) ends at byte {pos + info.file_size}, "
            f"but the file has {size} bytes; {FIX}"
        )
    return pos


def _unpickle(data: bytes, path: Path) -> tuple[Any, dict[int, tuple[str, int]]]:
    """The object in ``data.pkl``, its tensors on the meta device, and each storage's (key, bytes) by identity."""
    from torch import _weights_only_unpickler as weights_only

    storages: dict[str, Any] = {}
    by_storage: dict[int, tuple[str, int]] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise _Refused(f"has a corrupt pickle (data.pkl holds an unknown persistent id); {FIX}")
        _, storage_type, key, _location, numel = pid
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        if key in storages:
            return storages[key]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
            raise _Refused(f"has a corrupt pickle (storage {key} has no valid type or size); {FIX}")
        if dtype in _QUANTIZED:
            raise _Refused(
                f"holds quantized tensors ({dtype}), which ckptdiff does not compare; "
                "dequantize them (tensor.dequantize()) and re-save"
            )
        nbytes = numel * dtype.itemsize
        untyped = torch.UntypedStorage(nbytes, device="meta")
        storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        storages[key] = storage
        by_storage[untyped._cdata] = (key, nbytes)
        return storage

    unpickler = weights_only.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle (protocol, beta layouts): ckptdiff judges it
            warnings.simplefilter("ignore")
            obj = unpickler.load()
    except _Refused as e:
        raise InputError(f"{path} {e}") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("Unsupported operand"):  # a pickle protocol above 2, which torch.load refuses alike
            raise InputError(
                f"{path} uses a pickle protocol that a weights-only load does not read ({_clip(str(e))}); re-save "
                "it with torch.save's default protocol, or convert it to safetensors"
            ) from None
        found = _GLOBAL.search(str(e))
        what = f"imports {found.group(1)}" if found else "uses objects or operations beyond tensors and containers"
        raise InputError(
            f"{path} is not a weights-only PyTorch checkpoint: its pickle {what}, and ckptdiff runs no code from a "
            "checkpoint; convert it to safetensors in an environment you trust"
        ) from None
    except EOFError:
        raise InputError(f"{path} is corrupt: its pickle (data.pkl) ends early; {FIX}") from None
    except Exception as e:  # anything a hostile pickle makes the unpickler or a rebuild function raise
        raise InputError(
            f"{path} has a corrupt pickle (data.pkl: {type(e).__name__}: {_clip(str(e))}); {FIX}"
        ) from None
    finally:
        # Sparse rebuilds queue their tensors for a validation torch.load would run; running it clears the queue
        # (meta tensors may fail it: the queue is cleared either way).
        with contextlib.suppress(Exception):
            torch._utils._validate_loaded_sparse_tensors()
    return obj, by_storage


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a state dict, unwrapping ``{"state_dict": ...}`` and its usual variants."""
    for key in _STATE_DICT_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict of named tensors")
    out: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        if name in out:  # 1 and "1": two tensors, one name once the keys are text
            raise InputError(
                f"{path} holds two tensors whose keys both read {name!r} as text ({kinds[name]} and "
                f"{type(k).__name__}); re-save the state dict with distinct string keys"
            )
        out[name], kinds[name] = v, type(k).__name__
    if not out and obj:
        raise InputError(f"{path} holds no tensors at its top level; pass a state dict")
    return out


def _dense(t: torch.Tensor, name: str, path: Path) -> None:
    if t.layout != torch.strided:
        raise InputError(
            f"{path}: tensor {name!r} is a {_LAYOUTS.get(t.layout, str(t.layout))} tensor; ckptdiff compares dense "
            "tensors only: save it with .to_dense(), or leave it out"
        )
    if t.is_nested:
        raise InputError(f"{path}: tensor {name!r} is a nested tensor; ckptdiff compares dense tensors only")
    if t.is_quantized:
        raise InputError(f"{path}: tensor {name!r} is quantized ({t.dtype}), which ckptdiff does not compare")


def read_archive(path: Path, fd: int, size: int) -> dict[str, StoredTensor]:
    """Every tensor of the state dict in the ``torch.save`` file open on ``fd``, validated; nothing else read."""
    try:
        head = os.pread(fd, 512, 0)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}; check the file") from None
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise _not_a_zip(path, head, size)
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as zf:
            return _read_zip(zf, path, fd, size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, OverflowError, ValueError) as e:
        reason = "its zip directory is missing" if "not a zip file" in str(e) else "its zip structure is damaged"
        raise InputError(
            f"{path} is truncated or corrupt: it starts like a torch.save zip archive, but {reason} "
            f"({_clip(str(e))}); {FIX}"
        ) from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}; check the file") from None


def _read_zip(zf: zipfile.ZipFile, path: Path, fd: int, size: int) -> dict[str, StoredTensor]:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{path} is corrupt: its zip directory lists {twice} twice; {FIX}")
    folder = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    by_name = {i.filename: i for i in infos}
    if folder + "constants.pkl" in by_name:
        raise InputError(
            f"{path} is a TorchScript archive (a scripted model), not a state dict; save the weights with "
            "torch.save(model.state_dict()) or convert them to safetensors"
        )
    pickled = by_name.get(folder + "data.pkl") if folder else None
    if pickled is None:
        raise InputError(
            f"{path} is a zip archive but not a torch.save checkpoint (it has no data.pkl); check the path"
        )
    order = by_name.get(folder + "byteorder")
    if order is not None:
        mark = _record(zf, order, path)
        if mark == b"big":
            raise InputError(
                f"{path} stores big-endian data, which ckptdiff does not read; re-save it on a little-endian machine"
            )
        if mark != b"little":
            raise InputError(f"{path} is corrupt: its byteorder record says {mark[:20]!r}; {FIX}")
    obj, by_storage = _unpickle(_record(zf, pickled, path), path)
    positions: dict[str, int] = {}
    out: dict[str, StoredTensor] = {}
    for name, t in _state_dict(obj, path).items():
        _dense(t, name, path)
        found = by_storage.get(t.untyped_storage()._cdata) if t.device.type == "meta" else None
        if found is None:
            raise InputError(
                f"{path}: tensor {name!r} has no data in the file (it was saved without storage, e.g. on the meta "
                "device); re-save it with its weights"
            )
        key, nbytes = found
        if key not in positions:
            info = by_name.get(f"{folder}data/{key}")
            if info is None:
                raise InputError(f"{path} is corrupt: tensor {name!r} needs record data/{key}, which is missing; {FIX}")
            _stored_plainly(info, path)
            if info.file_size != nbytes:
                raise InputError(
                    f"{path} is corrupt: tensor {name!r} needs {nbytes} bytes of storage, but its record data/{key} "
                    f"holds {info.file_size}; {FIX}"
                )
            positions[key] = _data_position(fd, info, size, path, name)
        shape, stride = tuple(int(d) for d in t.shape), tuple(int(d) for d in t.stride())
        stored = StoredTensor(t.dtype, shape, stride, int(t.storage_offset()), positions[key], nbytes)
        first, end = stored.span
        if first < 0 or any(s < 0 for s in stored.stride) or end * t.dtype.itemsize > nbytes:
            raise InputError(
                f"{path} is corrupt: tensor {name!r} reaches past the end of its storage (record data/{key}); {FIX}"
            )
        out[name] = stored
    return out
