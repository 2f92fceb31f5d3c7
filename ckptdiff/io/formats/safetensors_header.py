"""Strict safetensors headers: accept exactly the files the ``safetensors`` library itself (0.8) opens.

A safetensors file is an 8-byte little-endian length N, N bytes of UTF-8 JSON, then the data section. What
``safetensors.safe_open`` enforces, found by experiment against 0.8.0 and mirrored here rule for rule:

* N is at most 100,000,000 and the header fits in the file; the header is valid UTF-8 and strict JSON
  (no NaN/Infinity, no trailing commas or bytes other than JSON whitespace, no unpaired ``\\uD800``-style
  escapes, no number a 64-bit float cannot hold, at most 127 nested arrays/objects), and a JSON object.
* ``__metadata__`` is absent, ``null``, or an object of string values (a repeated key keeps the last value);
  it may appear once.
* Every other key is a tensor: an object with ``dtype``, ``shape`` and ``data_offsets`` (each at most once;
  other keys are ignored) or, equally, a 3-element array ``[dtype, shape, data_offsets]``. ``dtype`` is one of
  the 22 names below, written as a string or as ``{"NAME": null}``. ``shape`` is an array and ``data_offsets``
  a 2-element array of integers in [0, 2^64): no floats (not even ``2.0`` or ``-0``), strings or booleans.
* Sorted by ``data_offsets``, the tensors tile the data section from byte 0 with no gap or overlap (empty
  tensors may sit on any boundary), each spans exactly its shape's bytes (the element count and bit count
  must fit in 64 bits, sub-byte dtypes must end on a byte boundary), and the last one ends exactly at the end
  of the file.

Where ckptdiff deliberately refuses a file that ``safe_open`` opens, the reason says so: a tensor name listed
twice (``safe_open`` silently keeps the last entry, other readers the first, so the file means different
things to different tools), a dtype ckptdiff cannot compare, and a dimension of 2^63 or more (PyTorch cannot
represent it).
"""

from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

from ckptdiff.io.files import nested_deeper

MAX_HEADER_BYTES = 100_000_000
MAX_DEPTH = 127  # nested arrays/objects, the top-level object included
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
FIX = "re-download or re-save it"

# Bits per element of every dtype safetensors 0.8 knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # a cheap gate: only then look for lone surrogates
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEGATIVE_ZERO = re.compile(r"-0(?![.eE0-9])")


class HeaderProblem(Exception):
    """Why a header is refused: a clause that follows the file's name, and what to do about it."""

    def __init__(self, reason: str, fix: str = FIX):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


class Entry(NamedTuple):
    """One tensor as the header describes it; offsets are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A header that passed every check: tensors in the order the header lists them, and ``__metadata__``."""

    entries: tuple[Entry, ...]
    metadata: dict[str, str]


# JSON objects are decoded as tuples of (key, value) pairs (``object_pairs_hook=tuple``, which runs in C): a
# repeated key stays visible, and a tuple cannot be confused with a JSON array, which decodes as a list.
Pairs = tuple[tuple[str, Any], ...]


def _int(text: str) -> int | float:
    """Integers, checked one by one: only for a header that holds ``-0`` somewhere (usually inside a name)."""
    # JSON integers have no leading zeros, so more than 309 digits is past the largest 64-bit float.
    if len(text.lstrip("-")) > 309:
        raise HeaderProblem(f"has a corrupt header (the number {_clip(text)} is out of range)")
    if text == "-0":
        return -0.0  # safetensors reads "-0" as a float, which no shape or offset may be
    value = int(text)
    if abs(value) > U64_MAX:
        try:
            float(value)
        except OverflowError:
            raise HeaderProblem(f"has a corrupt header (the number {_clip(text)} is out of range)") from None
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise HeaderProblem(f"has a corrupt header (the number {_clip(text)} is out of range)")
    return value


def _constant(text: str) -> Any:
    raise HeaderProblem(f"has a corrupt header ({text} is not valid JSON)")


def _clip(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain(value: Any) -> Any:
    """The decoded value with objects as dicts again, for messages."""
    if isinstance(value, tuple):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    try:
        text = json.dumps(_plain(value), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # pragma: no cover - decoded JSON always dumps
        text = repr(value)
    return _clip(text, 40)


def _too_big(value: int) -> bool:
    """Whether an integer is past the largest 64-bit float (safetensors reads such a number as out of range)."""
    if -U64_MAX <= value <= U64_MAX:
        return False
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _extra(value: Any) -> None:
    """A value safetensors ignores must still be JSON it can hold: no integer past a float (its depth is bounded
    with the whole header's, by :func:`_decode`)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is int and _too_big(v):
            raise HeaderProblem(f"has a corrupt header (the number {_clip(str(v))} is out of range)")
        if isinstance(v, tuple):
            stack.extend(x for _, x in v)
        elif isinstance(v, list):
            stack.extend(v)


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, tuple):
            for k, x in v:
                stack.append(k)
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _decode(raw: bytes) -> Pairs:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderProblem(f"has a corrupt header (not valid UTF-8 at byte {e.start} of the header)") from None
    if nested_deeper(raw, MAX_DEPTH):  # before the decoder, which recurses once per level
        raise HeaderProblem(f"has a corrupt header (JSON nested more than {MAX_DEPTH} levels deep)")
    hooks: dict[str, Any] = {"object_pairs_hook": tuple, "parse_float": _float, "parse_constant": _constant}
    if "-0" in text and _NEGATIVE_ZERO.search(text):  # safetensors reads "-0" as a float: check integers one by one
        hooks["parse_int"] = _int
    try:
        doc = json.loads(text, **hooks)
    except json.JSONDecodeError as e:
        raise HeaderProblem(f"has a corrupt header (not valid JSON: {e.msg} at character {e.pos})") from None
    except RecursionError:  # pragma: no cover - the nesting scan refuses such a header first
        raise HeaderProblem(f"has a corrupt header (JSON nested more than {MAX_DEPTH} levels deep)") from None
    except ValueError:  # int() refuses integers of over 4,300 digits, far past any 64-bit float
        raise HeaderProblem("has a corrupt header (an integer is out of range)") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(doc):
        raise HeaderProblem("has a corrupt header (a string holds an unpaired UTF-16 surrogate escape)")
    if not isinstance(doc, tuple):
        raise HeaderProblem("has a corrupt header (not a JSON object)")
    return doc


def _usizes(value: Any, length: int = -1) -> bool:
    """A JSON array of integers in [0, 2^64) (no floats, booleans or strings), of ``length`` items if given."""
    if type(value) is not list or (length >= 0 and len(value) != length):
        return False
    if not value:
        return True
    return set(map(type, value)) == {int} and min(value) >= 0 and max(value) <= U64_MAX


def _dtype(name: str, value: Any) -> str:
    if isinstance(value, tuple):  # the enum's map form: {"F32": null}
        if len(value) != 1 or value[0][1] is not None:
            raise HeaderProblem(f"has a malformed header entry for tensor {name!r}: dtype {_show(value)} is not a name")
        value = value[0][0]
    if not isinstance(value, str):
        raise HeaderProblem(f"has a malformed header entry for tensor {name!r}: dtype {_show(value)} is not a name")
    if value not in DTYPE_BITS:
        raise HeaderProblem(f"has a malformed header entry for tensor {name!r}: unknown dtype {value!r}")
    return value


def _fields(name: str, pairs: Pairs) -> tuple[Any, Any, Any]:
    """dtype, shape and data_offsets of an entry written as an object, which may hold other keys."""
    bad = f"has a malformed header entry for tensor {name!r}"
    d = dict(pairs)
    if len(pairs) == 3 and len(d) == 3 and "dtype" in d and "shape" in d and "data_offsets" in d:
        return d["dtype"], d["shape"], d["data_offsets"]  # the usual entry, with nothing else to check
    keys = [k for k, _ in pairs]
    for field in _FIELDS:
        if keys.count(field) > 1:
            raise HeaderProblem(f"{bad}: {field!r} appears twice")
        if field not in d:
            raise HeaderProblem(f"{bad}: it has no {field!r}")
    for key, extra in pairs:
        if key not in _FIELDS:
            _extra(extra)
    return d["dtype"], d["shape"], d["data_offsets"]


def _entry(name: str, value: Any) -> Entry:
    if isinstance(value, tuple):
        dtype, shape, offsets = _fields(name, value)
    elif isinstance(value, list) and len(value) == 3:  # safetensors also reads [dtype, shape, data_offsets]
        dtype, shape, offsets = value
    else:
        raise HeaderProblem(
            f"has a malformed header entry for tensor {name!r}: expected an object with dtype, shape and "
            f"data_offsets, got {_show(value)}"
        )
    dt = _dtype(name, dtype)
    if not _usizes(shape):
        raise HeaderProblem(
            f"has a malformed header entry for tensor {name!r}: shape {_show(shape)} is not a list of integers "
            "in [0, 2^64)"
        )
    if not _usizes(offsets, 2):
        raise HeaderProblem(
            f"has a malformed header entry for tensor {name!r}: data_offsets {_show(offsets)} is not a pair of "
            "integers in [0, 2^64)"
        )
    return Entry(name, dt, tuple(shape), offsets[0], offsets[1])


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, tuple):
        raise HeaderProblem(f"has a corrupt header (__metadata__ is {_show(value)}, not an object of strings)")
    for key, v in value:
        if not isinstance(v, str):
            raise HeaderProblem(f"has a corrupt header (__metadata__ {key!r} is {_show(v)}, not a string)")
    return dict(value)  # a repeated key keeps its last value, as in safetensors


def _nbytes(e: Entry) -> int:
    """Bytes the entry's shape and dtype need, with safetensors' 64-bit overflow and byte-boundary rules."""
    count = 1
    for d in e.shape:  # checked at every step, as safetensors does: [2^40, 2^40, 0] overflows
        count *= d
        if count > U64_MAX:
            raise HeaderProblem(f"has a corrupt header: tensor {e.name!r} has shape {list(e.shape)}, too large")
    bits = count * DTYPE_BITS[e.dtype]
    if bits > U64_MAX:
        raise HeaderProblem(f"has a corrupt header: tensor {e.name!r} has shape {list(e.shape)}, too large")
    if bits % 8:
        raise HeaderProblem(
            f"has a corrupt header: tensor {e.name!r} ({count} x {e.dtype}) does not end on a byte boundary"
        )
    return bits // 8


def _check_layout(entries: list[Entry], data_len: int) -> None:
    """Sorted by offsets, the tensors tile the data section exactly, each spanning its own bytes."""
    expected = 0
    previous = ""
    for e in sorted(entries, key=itemgetter(3, 4)):  # (begin, end)
        if e.begin != expected or e.end < e.begin:
            where = f"tensor {e.name!r} has data offsets [{e.begin}, {e.end}]"
            if e.end < e.begin:
                raise HeaderProblem(f"has a corrupt header: {where}, which end before they begin")
            if e.begin > expected:
                after = f"tensor {previous!r} ends at {expected}" if previous else "the data section starts at 0"
                raise HeaderProblem(f"has a corrupt header: {where}, leaving a gap ({after})")
            raise HeaderProblem(
                f"has a corrupt header: {where}, overlapping tensor {previous!r} (which ends at {expected})"
            )
        need = _nbytes(e)
        if e.end - e.begin != need:
            raise HeaderProblem(
                f"has a corrupt header: tensor {e.name!r} has data offsets [{e.begin}, {e.end}] "
                f"({e.end - e.begin} bytes), but shape {list(e.shape)} of {e.dtype} needs {need} bytes"
            )
        expected = e.end
        previous = e.name
    if data_len < expected:
        raise HeaderProblem(
            f"is truncated: its tensors need {expected} bytes of data after the header, but it holds {data_len}"
        )
    if data_len > expected:
        extra = data_len - expected
        raise HeaderProblem(
            f"has {extra} unexpected byte{'s' if extra > 1 else ''} after its last tensor (the data section must "
            "end where the last tensor ends): it is corrupt, or was appended to"
        )


def check_length(header_len: int, file_size: int) -> None:
    """The 8-byte length prefix against safetensors' limit and the file's size."""
    if header_len > MAX_HEADER_BYTES:
        raise HeaderProblem(
            f"is corrupt or truncated: its header length {header_len} is over safetensors' limit of "
            f"{MAX_HEADER_BYTES:,} bytes"
        )
    if 8 + header_len > file_size:
        raise HeaderProblem(
            f"is corrupt or truncated: its header length {header_len} runs past the end of the file "
            f"({file_size} bytes)"
        )


def parse(raw: bytes, data_len: int) -> Header:
    """Validate header bytes ``raw`` for a data section of ``data_len`` bytes; :class:`HeaderProblem` if bad.

    Accepts exactly what ``safetensors.safe_open`` accepts, except for the deliberate refusals listed in the
    module docstring, each raised with its own reason.
    """
    # Decoding allocates several objects per tensor, none of them cyclic: with torch loaded, the cyclic garbage
    # collector would otherwise rescan the whole heap many times over and triple the time a big header takes.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse(raw, data_len)
    finally:
        if collecting:
            gc.enable()


def _parse(raw: bytes, data_len: int) -> Header:
    doc = _decode(raw)
    metadata: dict[str, str] = {}
    seen_metadata = False
    listed: list[Entry] = []
    for key, value in doc:
        if key == "__metadata__":
            if seen_metadata:
                raise HeaderProblem("has a corrupt header (__metadata__ appears twice)")
            seen_metadata = True
            metadata = _metadata(value)
        else:
            listed.append(_entry(key, value))
    entries = {e.name: e for e in listed}
    if len(entries) != len(listed):
        names = [e.name for e in listed]
        twice = next(n for n in names if names.count(n) > 1)
        raise HeaderProblem(
            f"lists tensor {twice!r} twice in its header; safetensors would silently use the last entry and other "
            "readers the first, so ckptdiff refuses to guess",
            "re-save the checkpoint so that every name appears once",
        )
    _check_layout(listed, data_len)
    return Header(tuple(listed), metadata)
