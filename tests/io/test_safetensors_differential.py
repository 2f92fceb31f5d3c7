"""ckptdiff's safetensors header parser accepts exactly the files ``safetensors.safe_open`` accepts.

Two halves: a table of hand-written headers, each with the verdict safetensors 0.8 gives (so a change in
safetensors shows up as a failing row, not as a silent drift), and a differential property test that
generates thousands of headers, valid and mutated, and compares the two parsers on every one.

ckptdiff refuses three kinds of file that ``safe_open`` opens, each with its own message: a tensor name listed
twice (safe_open keeps the last entry), a dtype ckptdiff does not compare, a dimension of 2^63 or more.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io.formats.safetensors import SafetensorsSource, read_safetensors_header
from ckptdiff.io.formats.safetensors_header import DTYPE_BITS, I64_MAX

ALL_DTYPES = sorted(DTYPE_BITS)

# ---------------------------------------------------------------------------------------------
# running both parsers on one file


def _data(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


def _write(path: Path, header: bytes, data_len: int, hlen: int | None = None) -> None:
    blob = struct.pack("<Q", len(header) if hlen is None else hlen) + header + _data(data_len)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:  # rewritten in place: truncating to zero and closing costs milliseconds on some file systems
        os.pwrite(fd, blob, 0)
        os.ftruncate(fd, len(blob))
    finally:
        os.close(fd)


def _safetensors(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]] | None:
    """What safe_open sees (names, dtypes, shapes, metadata), or None if it refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safe_open handles are not iterable
            seen = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in names}
            return seen, dict(f.metadata() or {})
    except Exception:  # safetensors raises SafetensorError, and OverflowError etc. on odd input
        return None


def _ckptdiff(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]] | str:
    """What ckptdiff sees, or the message of its InputError."""
    try:
        infos, _, meta = read_safetensors_header(path)
    except InputError as e:
        return str(e)
    return {k: (i.dtype.name, list(i.shape)) for k, i in infos.items()}, meta


def _top_level_repeats(text: str) -> bool:
    repeats: list[bool] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs if k != "__metadata__"]
        repeats.append(len(set(keys)) != len(keys))
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return repeats[-1]  # the top-level object is the last one closed


def _same_data(path: Path, seen: dict[str, tuple[str, list[int]]]) -> None:
    """Every tensor's bytes as safe_open reads them equal ckptdiff's positioned reads (so offsets agree)."""
    src = SafetensorsSource(str(path), [path], str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, (_, shape) in seen.items():
                if math.prod(shape) == 0:
                    continue
                want = f.get_tensor(name).reshape(-1).view(torch.uint8)
                got = src.read(name).view(torch.uint8)
                assert torch.equal(want, got), name
    finally:
        src.close()


def _compare(path: Path, check_data: bool = False) -> tuple[bool, bool]:
    """Assert the two parsers agree on ``path``; return (safetensors accepted, ckptdiff accepted)."""
    want = _safetensors(path)
    got = _ckptdiff(path)
    raw = path.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    if want is None:
        assert isinstance(got, str), f"safetensors refuses, ckptdiff accepts: {header[:300]!r}"
        return False, False
    seen, meta = want
    text = header.decode("utf-8")
    if _top_level_repeats(text):
        assert isinstance(got, str) and "twice" in got, (got, header[:300])
        return True, False
    refusals = []  # ckptdiff's own refusals that apply; it names the first tensor that has one
    if any(dt not in dtypes.BY_NAME for dt, _ in seen.values()):
        refusals.append("which ckptdiff does not support")
    if any(d > I64_MAX for _, shape in seen.values() for d in shape):
        refusals.append("with a dimension of 2^63 or more")
    if refusals:
        assert isinstance(got, str) and any(r in got for r in refusals), (got, header[:300])
        return True, False
    assert not isinstance(got, str), f"safetensors accepts, ckptdiff refuses ({got}): {header[:300]!r}"
    assert got == (seen, meta)
    if check_data:
        _same_data(path, seen)
    return True, True


# ---------------------------------------------------------------------------------------------
# the table: what safetensors 0.8 accepts and refuses, found by experiment

E = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def _ent(extra: str) -> str:
    return '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"zz":' + extra + "}}"


TABLE: list[tuple[str, str, int, bool]] = [
    # (case, header text, data bytes, safetensors accepts)
    ("plain", "{" + E + "}", 8, True),
    ("data longer than the tensors", "{" + E + "}", 9, False),
    ("data shorter than the tensors", "{" + E + "}", 7, False),
    ("trailing spaces", "{" + E + "}   ", 8, True),
    ("leading spaces", "  {" + E + "}", 8, True),
    ("trailing tab, newline, CR", "{" + E + "}\t\n\r", 8, True),
    ("trailing NUL", "{" + E + "}\0", 8, False),
    ("float dim 2.0", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8, False),
    ("offset -0", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', 8, False),
    ("offset 8e0", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8e0]}}', 8, False),
    ("string dim", '{"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}', 8, False),
    ("bool dim", '{"a":{"dtype":"BOOL","shape":[true],"data_offsets":[0,1]}}', 1, False),
    ("negative dim", '{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}', 0, False),
    ("dim 2^64", '{"a":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', 0, False),
    ("dim 2^64-1 after a 0", '{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}', 0, True),
    ("dims overflow before the 0", '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0,
     False),
    ("bit count overflows", '{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}}', 0, False),
    ("Infinity", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,Infinity]}}', 8, False),
    ("1e400 dim", '{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,8]}}', 8, False),
    ("5000-digit offset", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + "9" * 5000 + "]}}", 8, False),
    ("same tensor twice", "{" + E + "," + E + "}", 8, True),
    ("dtype field twice", '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("__metadata__ twice", '{"__metadata__":{},"__metadata__":{},' + E + "}", 8, False),
    ("__metadata__ null", '{"__metadata__":null,' + E + "}", 8, True),
    ("__metadata__ repeated key", '{"__metadata__":{"k":"1","k":"2"},' + E + "}", 8, True),
    ("__metadata__ list", '{"__metadata__":[],' + E + "}", 8, False),
    ("__metadata__ string", '{"__metadata__":"x",' + E + "}", 8, False),
    ("__metadata__ int value", '{"__metadata__":{"k":1},' + E + "}", 8, False),
    ("__metadata__ escaped key", '{"\\u005f_metadata__":{"k":"v"},' + E + "}", 8, True),
    ("extra field", _ent('[1.5,{"q":null}]'), 8, True),
    ("extra field 1e400", _ent("1e400"), 8, False),
    ("extra field 1e308", _ent("1.7976931348623157e308"), 8, True),
    ("extra field 1e-400", _ent("1e-400"), 8, True),
    ("extra field 309-digit int", _ent("1" + "0" * 308), 8, True),
    ("extra field int past float range", _ent("2" + "0" * 308), 8, False),
    ("extra field NaN", _ent("NaN"), 8, False),
    ("extra field leading zero", _ent("01"), 8, False),
    ("extra field lone surrogate", _ent('"\\ud800"'), 8, False),
    ("extra field surrogate pair", _ent('"\\ud83d\\ude00"'), 8, True),
    ("extra field 125 arrays deep", _ent("[" * 125 + "]" * 125), 8, True),
    ("extra field 126 arrays deep", _ent("[" * 126 + "]" * 126), 8, False),
    ("100,000 arrays deep", '{"a":' + "[" * 100000 + "]" * 100000 + "}", 0, False),
    ("array entry", '{"a":["F32",[2],[0,8]]}', 8, True),
    ("array entry of 4", '{"a":["F32",[2],[0,8],1]}', 8, False),
    ("dtype as map", '{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8, True),
    ("dtype as map with a value", '{"a":{"dtype":{"F32":0},"shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("dtype as integer", '{"a":{"dtype":17,"shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("lower-case dtype", '{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("missing shape", '{"a":{"dtype":"F32","data_offsets":[0,8]}}', 8, False),
    ("three offsets", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', 8, False),
    ("scalar", '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', 4, True),
    ("hole before the first tensor", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, False),
    ("overlap",
     '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     4, False),
    ("empty tensors share an offset",
     '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
     0, True),
    ("empty tensor inside another",
     '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}}',
     4, False),
    ("offsets out of order",
     '{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     8, True),
    ("offsets backwards", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', 0, False),
    ("F4, odd count", '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, False),
    ("F4, even count", '{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', 2, True),
    ("empty header object", "{}", 0, True),
    ("top-level array", "[]", 0, False),
    ("UTF-8 BOM", "\ufeff{}", 0, False),
    ("entry is a number", '{"a":5}', 0, False),
    ("control character in a name", '{"a\x01":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("DEL in a name", '{"a\x7f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    ("empty name", '{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    ("only whitespace", "   ", 0, False),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("headers") / "h.safetensors"


@pytest.mark.parametrize(("text", "data_len", "accepted"), [c[1:] for c in TABLE], ids=[c[0] for c in TABLE])
def test_table_matches_safetensors(scratch: Path, text: str, data_len: int, accepted: bool) -> None:
    _write(scratch, text.encode(), data_len)
    st_ok, _ = _compare(scratch, check_data=True)
    assert st_ok == accepted, "safetensors' verdict changed; update the table and io.formats.safetensors_header"


def test_length_prefix_rules(scratch: Path) -> None:
    for raw in (b"", b"\0" * 3, b"\2\0\0\0\0\0\0"):  # shorter than the 8-byte length
        scratch.write_bytes(raw)
        assert _safetensors(scratch) is None and "truncated" in str(_ckptdiff(scratch))
    for hlen in (5, 2**63, 2**64 - 1, 100_000_001):  # past the file, or over the 100,000,000-byte limit
        _write(scratch, b"{}", 0, hlen=hlen)
        assert _safetensors(scratch) is None and "corrupt or truncated" in str(_ckptdiff(scratch))
    _write(scratch, b"{\xff}", 0)
    assert _safetensors(scratch) is None and "UTF-8" in str(_ckptdiff(scratch))


# ---------------------------------------------------------------------------------------------
# the differential property test


@dataclass
class Raw:
    """A JSON token written as is (numbers and escapes json.dumps would not write)."""

    text: str


@dataclass
class Obj:
    """A JSON object that may repeat keys; keys are str or Raw (an escaped spelling)."""

    pairs: list[tuple[Any, Any]]


def emit(value: Any, ws: str, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        inner = f",{ws}".join(f"{emit(k, ws, ascii_only)}:{ws}{emit(v, ws, ascii_only)}" for k, v in value.pairs)
        return "{" + ws + inner + ws + "}"
    if isinstance(value, list):
        return "[" + f",{ws}".join(emit(v, ws, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@dataclass
class Tensor:
    name: Any
    dtype: Any
    shape: Any
    offsets: Any
    form: str = "object"  # or "array"
    extras: list[tuple[Any, Any]] = field(default_factory=list)
    drop: str = ""  # a field left out
    repeat: str = ""  # a field written twice
    replace: Any = None  # the whole entry replaced by this value

    def value(self) -> Any:
        if self.replace is not None:
            return self.replace
        if self.form == "array":
            return [self.dtype, self.shape, self.offsets]
        pairs = [(k, v) for k, v in (("dtype", self.dtype), ("shape", self.shape), ("data_offsets", self.offsets))
                 if k != self.drop]
        pairs += [p for p in pairs if p[0] == self.repeat]
        return Obj(pairs + self.extras)


BAD_NUMBERS = [Raw("2.0"), "2", True, None, -1, Raw("-0"), 2**64, 2**64 - 1, 2**63, Raw("1e400"), Raw("1e2"), [1],
               Raw("1" + "0" * 400), Raw("-5"), 0.5]
BAD_DTYPES = ["f32", "U3", "", 17, None, ["F32"], Obj([("F32", None)]), Obj([("BF16", None)]), Obj([("F32", 0)]),
              Obj([]), Obj([("F32", None), ("F16", None)]), Obj([("F32", None), ("F32", None)]), Obj([("x", None)])]
NAMES = ["a", "b", "w.0", "é", "", "ab"]


class Genes:
    """Choices read from hypothesis-drawn bytes: one cheap draw per example, and shrinking towards zero bytes
    shrinks towards the plainest header (no tensors, no mutations)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.i = 0

    def below(self, n: int) -> int:
        b = self.raw[self.i] if self.i < len(self.raw) else 0
        self.i += 1
        return b % n

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.below(len(seq))]

    def coin(self) -> bool:
        return self.below(2) == 1


NUMBER_TOKENS = ["1e308", "1e309", "-1e400", "1" + "0" * 308, "2" + "0" * 308, "-" + "3" * 310, "1e-400",
                 "0e99999", "-0", "01", "1.", ".5", "NaN", "Infinity", "-Infinity", "1E2", "1e+2", "-0.0",
                 "18446744073709551616", "123456789012345678901234567890", "-9223372036854775809", "0.5", "7"]
STRINGS = ['"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\ud83d\\u0041"', '"\\u0000"', '"\\\\ud800"',
           '"\\/"', '"\\x"', '"a\tb"', '"\\u00e9"', '"ok"']
LEAVES: list[Any] = [None, True, False, 0, -1, 2**64, 1.5, -0.0, "", "é", "s"]


def json_value(g: Genes, depth: int = 0) -> Any:
    """An arbitrary JSON value for a field safetensors ignores."""
    kind = g.below(5) if depth < 3 else 0
    if kind == 0:
        return g.pick(LEAVES)
    if kind == 1:
        return Raw(g.pick(NUMBER_TOKENS))
    if kind == 2:
        return Raw(g.pick(STRINGS))
    if kind == 3:
        return [json_value(g, depth + 1) for _ in range(g.below(3))]
    return Obj([(g.pick(["k", "", "dtype"]), json_value(g, depth + 1)) for _ in range(g.below(3))])


MUTATIONS = ["shape_value", "shape_type", "offset_shift", "offset_value", "offset_length", "dtype_bad", "dtype_swap",
             "array_form", "entry_scalar", "extra", "deep", "repeat_field", "drop_field", "repeat_name", "metadata",
             "data_len", "padding", "length_prefix", "raw_bytes", "huge_shape", "escaped_key", "surrogate_key"]
METADATA = [None, Obj([]), Obj([("k", "v")]), Obj([("k", 1)]), Obj([("k", None)]), [], "x",
            Obj([("k", "1"), ("k", "2")]), Obj([("k", Obj([]))]), Obj([(Raw('"\\ud800"'), "v")])]
HUGE_SHAPES = [[0, 2**64 - 1], [2**64 - 1, 0], [2**32, 2**32, 0], [0, 2**32, 2**32], [2**63, 0], [0, 2**63 - 1],
               [2**62], [2**61, 0, 3], [2**60]]


def mutate(g: Genes, m: str, tensors: list[Tensor], t: Tensor | None, state: dict[str, Any]) -> None:
    """Apply mutation ``m`` to tensor ``t`` (if it needs one) or to the file as a whole (``state``)."""
    if m == "shape_value" and t is not None:
        shape = list(t.shape) if isinstance(t.shape, list) else []
        shape.insert(g.below(len(shape) + 1), g.pick(BAD_NUMBERS))
        t.shape = shape
    elif m == "shape_type" and t is not None:
        t.shape = g.pick([Obj([]), None, "x", 5, Raw("[2,]")])
    elif m == "offset_shift" and t is not None and isinstance(t.offsets, list) and len(t.offsets) == 2:
        i = g.below(2)
        if type(t.offsets[i]) is int:
            t.offsets[i] = max(0, t.offsets[i] + g.pick([-3, -2, -1, 1, 2, 3]))
    elif m == "offset_value" and t is not None and isinstance(t.offsets, list) and t.offsets:
        t.offsets[g.below(len(t.offsets))] = g.pick(BAD_NUMBERS)
    elif m == "offset_length" and t is not None and isinstance(t.offsets, list):
        t.offsets = t.offsets[:1] if g.coin() else [*t.offsets, 0]
    elif m == "dtype_bad" and t is not None:
        t.dtype = g.pick(BAD_DTYPES)
    elif m == "dtype_swap" and t is not None:
        t.dtype = g.pick(ALL_DTYPES)
    elif m == "array_form" and t is not None:
        t.form = "array"
    elif m == "entry_scalar" and t is not None:
        t.replace = g.pick([5, None, "x", [], True, ["F32", [0]], Obj([])])
    elif m == "extra" and t is not None:
        t.extras.append((g.pick(["zz", "dtypes", "x"]), json_value(g)))
    elif m == "deep" and t is not None:
        depth = g.pick([124, 125, 126, 127])
        t.extras.append(("deep", Raw("[" * depth + "]" * depth)))
    elif m == "repeat_field" and t is not None:
        t.repeat = g.pick(["dtype", "shape", "data_offsets"])
        if g.coin():
            t.extras += [("zz", 1), ("zz", 2)]
    elif m == "drop_field" and t is not None:
        t.drop = g.pick(["dtype", "shape", "data_offsets"])
    elif m == "repeat_name" and t is not None:
        copy = Tensor(t.name, t.dtype, t.shape, t.offsets)
        if g.coin():  # a second, empty entry at an offset that keeps the layout valid
            copy = Tensor(t.name, "F32", [0], [state["data_len"], state["data_len"]])
        tensors.insert(g.below(len(tensors) + 1), copy)
    elif m == "metadata":
        state["metadata"].append(g.pick(METADATA))
    elif m == "data_len":
        state["data_len"] = max(0, state["data_len"] + g.pick([-2, -1, 1, 2]))
    elif m == "padding":
        state["pad"] = g.pick([" ", "   ", "\n", "\t\r\n ", "\0", "x", ",", "\u00a0"])
        state["ws"] = g.pick(["", " ", "\n  "])
    elif m == "length_prefix":
        state["hlen_delta"] = g.pick([-3, -1, 1, 2, 10**6, 2**40])
    elif m == "raw_bytes":
        state["raw_edit"] = (g.pick(["cut", "byte", "bom", "utf8"]), g.below(256), g.below(256))
    elif m == "huge_shape" and t is not None:
        t.shape = g.pick(HUGE_SHAPES)
        if math.prod(t.shape) == 0 and isinstance(t.offsets, list) and len(t.offsets) == 2:
            t.offsets = [t.offsets[0], t.offsets[0]]
    elif m == "escaped_key" and t is not None:
        spelled = "".join(f"\\u{ord(c):04x}" for c in str(t.name))
        t.name = Raw(f'"{spelled}"')
    elif m == "surrogate_key" and t is not None:
        t.name = Raw(g.pick(STRINGS[:4]))


def build(raw: bytes) -> tuple[bytes, int, int | None]:
    """A header (bytes), its data length, and an optional wrong length prefix, all decided by ``raw``."""
    g = Genes(raw)
    names = [n for n in NAMES if g.below(3) == 0]
    tensors: list[Tensor] = []
    for name in names:
        shape = [g.below(5) for _ in range(g.below(4))]
        tensors.append(Tensor(name, g.pick(ALL_DTYPES), shape, None))
    order = sorted(range(len(tensors)), key=lambda i: (g.below(4), i))
    pos = 0
    for i in order:  # contiguous, in an order of their own: safetensors sorts by offset
        t = tensors[i]
        nbytes = -(-math.prod(t.shape) * DTYPE_BITS[t.dtype] // 8)
        t.offsets = [pos, pos + nbytes]
        pos += nbytes
    state: dict[str, Any] = {"data_len": pos, "metadata": [], "ws": "", "pad": "", "hlen_delta": 0, "raw_edit": None}
    for _ in range(g.below(4)):
        mutate(g, g.pick(MUTATIONS), tensors, g.pick(tensors) if tensors else None, state)
    top: list[tuple[Any, Any]] = [(t.name, t.value()) for t in tensors]
    for v in state["metadata"]:
        top.insert(g.below(len(top) + 1), ("__metadata__", v))
    header = (emit(Obj(top), state["ws"], g.coin()) + state["pad"]).encode()
    if state["raw_edit"] is not None:
        how, at, byte = state["raw_edit"]
        at = min(at, len(header))
        if how == "cut":
            header = header[:at]
        elif how == "byte" and header:
            at = min(at, len(header) - 1)
            header = header[:at] + bytes([byte]) + header[at + 1 :]
        elif how == "bom":
            header = b"\xef\xbb\xbf" + header
        else:
            header = header[:at] + b"\xff" + header[at:]
    hlen = None if state["hlen_delta"] == 0 else max(0, len(header) + state["hlen_delta"])
    return header, state["data_len"], hlen


@settings(
    max_examples=3000,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(genes=st.binary(max_size=64))
def test_ckptdiff_accepts_exactly_what_safetensors_accepts(scratch: Path, genes: bytes) -> None:
    header, data_len, hlen = build(genes)
    _write(scratch, header, data_len, hlen)
    _compare(scratch, check_data=True)
