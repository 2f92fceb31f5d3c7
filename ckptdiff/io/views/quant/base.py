"""What every quantized format shares: the logical tensor, the codec, the refusal, and the recogniser's protocol.

A format module (``mxfp4``, ``compressed``, ``bnb``, ``gptq``) holds its :class:`Codec` subclasses (how stored
parts make values) and one :class:`Format` (how its weights are found among the stored tensors); ``recognise``
lists the formats in the order they are tried. Nothing here knows a format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views.config import ModelConfig

HINT = "pass --as-stored to compare the stored tensors as they are, on purpose"


# ---------------------------------------------------------------------------------------------
# the logical tensor and its codec


class Reader(Protocol):
    """What a codec reads its parts through (:class:`ckptdiff.io.views.quant.source.QuantSource`)."""

    @property
    def spec(self) -> str: ...

    @property
    def inner(self) -> Source: ...

    @property
    def memo(self) -> dict[str, Any]: ...

    def remember(self, key: str, value: Any) -> None: ...

    def whole(self, info: TensorInfo) -> torch.Tensor: ...


@dataclass(frozen=True)
class QuantInfo(TensorInfo):
    """A quantized weight as the analyses see it (``codec`` set: dtype F32, logical shape), or a stored tensor
    compared as stored with a ``note`` (``--as-stored``)."""

    codec: Codec | None = None
    note: str = ""
    origin: str = ""  # the logical name before the expert split (``name`` is ``origin[e]`` for a slice)

    @property
    def storage(self) -> str:
        """The dtype as reports write it: ``mxfp4``, ``int4/g128``, ``nf4/64``, ..."""
        return self.codec.label if self.codec is not None else ""


def split_nibbles(packed: torch.Tensor, low_first: bool) -> torch.Tensor:
    """uint8 bytes (..., k) -> uint8 codes (..., k, 2): each byte's two nibbles, in the format's order."""
    out = torch.empty(*packed.shape, 2, dtype=torch.uint8)
    lo, hi = (0, 1) if low_first else (1, 0)
    torch.bitwise_and(packed, 0x0F, out=out[..., lo])
    torch.bitwise_right_shift(packed, 4, out=out[..., hi])
    return out


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


@dataclass(frozen=True)
class Codec:
    """One quantized weight's stored parts and how they make its values (subclasses: one per format)."""

    fmt: str
    shape: tuple[int, ...]  # logical
    parts: tuple[tuple[str, TensorInfo], ...]

    @property
    def label(self) -> str:
        return self.fmt

    def part(self, role: str) -> TensorInfo | None:
        for r, info in self.parts:
            if r == role:
                return info
        return None

    def need(self, role: str) -> TensorInfo:
        info = self.part(role)
        assert info is not None, role
        return info

    @property
    def row_len(self) -> int:
        return math.prod(self.shape[1:])

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        """The fp32 values of logical rows [r0, r1), flat, row-major."""
        raise NotImplementedError

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        """The codes of logical rows [r0, r1), flat, row-major, one per entry (a float code's −0 as its +0)."""
        raise NotImplementedError

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        """The scale groups that rows [r0, r1) use, one row each: (scale[, zero point]) as float64."""
        raise NotImplementedError


def rows_of(src: Reader, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) along the first dimension of a stored tensor, in its stored shape."""
    per = math.prod(info.shape[1:])
    flat = src.inner.read(info.name, r0 * per, (r1 - r0) * per)
    return flat.reshape(r1 - r0, *info.shape[1:])


def groups_of(src: Reader, g_idx: TensorInfo, n_groups: int) -> torch.Tensor:
    """The group of every input column, from an act-order ``g_idx``; InputError when one names no group."""
    g = src.whole(g_idx).to(torch.int64).reshape(-1)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise InputError(
            f"{src.spec}: {g_idx.name!r} names group {int(g.max()) if int(g.max()) >= n_groups else int(g.min())}, "
            f"but the weight has {n_groups} scale groups; the checkpoint is corrupt: re-download or re-export it"
        )
    return g


def fdt(*infos: TensorInfo | None) -> torch.dtype:
    """The dtype a value is formed in: fp32, whose one multiply of two exact fp32 numbers rounds the exact product
    once, as float64 then a cast would; float64 where a part (an F64 scale) is not an fp32 number."""
    return torch.float64 if any(i is not None and i.dtype.name == "F64" for i in infos) else torch.float32


def scale_rows(src: Reader, scale: TensorInfo, r0: int, r1: int, out_rows: int) -> torch.Tensor:
    """The (r1 − r0, G) float64 scales of rows [r0, r1): per tensor (one value), or per row."""
    if scale.numel == 1:
        return f64(src.inner.read(scale.name)).reshape(1, 1).expand(r1 - r0, 1)
    return f64(rows_of(src, scale, r0, r1)).reshape(r1 - r0, -1)


def unpack_rows(words: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """(rows, ⌈width·bits/32⌉) int32 words -> (rows, width) unsigned codes, the first in the lowest bits."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # the mask drops the sign fill
    return codes.to(torch.uint8).reshape(words.shape[0], -1)[:, :width]


# ---------------------------------------------------------------------------------------------
# refusals and small parts read while recognising


class Refusal(InputError):
    """A recognised quantized layout ckptdiff does not dequantize, or a config that contradicts the tensors."""


def refuse(src: Source, what: str) -> Refusal:
    return Refusal(f"{src.spec}: {what}; {HINT}")


class HeaderOnly(Refusal):
    """A part that says how to read a quantized weight, in a source opened header-only (no data can be read)."""


def read_small(src: Source, info: TensorInfo) -> torch.Tensor:
    """A small part that says how to read a quantized weight (its shape, its state); a source opened header-only
    cannot read it, which is said in one line."""
    try:
        return src.read(info.name)
    except InputError as e:
        if "header-only" not in str(e):
            raise
        raise HeaderOnly(
            f"{src.spec}: tensor {info.name!r} holds what a quantized weight's shape is, and --header-only reads no "
            f"tensor data; drop --header-only, or {HINT}"
        ) from None


def small_ints(src: Source, info: TensorInfo) -> list[int]:
    if info.dtype.is_float or info.numel > 8:
        raise refuse(
            src,
            f"tensor {info.name!r} should hold a few integers (a shape), holds {info.dtype.short} {list(info.shape)}",
        )
    return [int(v) for v in read_small(src, info).tolist()]


def as_int(value: Any) -> int | None:
    return value if type(value) is int else None


def quant_config(config: ModelConfig | None) -> dict[str, Any]:
    if config is None:
        return {}
    q = config.data.get("quantization_config")
    return q if isinstance(q, dict) else {}


def tail(name: str) -> str:
    """The last dotted part of a stored name (``weight_packed`` of ``x.weight_packed``)."""
    return name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# recognition: what the headers show, and the protocol each format follows


@dataclass
class Found:
    """What the headers show: quantized weights per format, their parts, and the tensors they hide."""

    codecs: dict[str, Codec] = field(default_factory=dict)  # logical name -> codec
    hidden: set[str] = field(default_factory=set)
    formats: dict[str, int] = field(default_factory=dict)  # format -> count


class Recognition:
    """One source being recognised: its tensors, its ``quantization_config``, and what has been found so far."""

    def __init__(self, src: Source, config: ModelConfig | None):
        self.src = src
        self.infos = src.infos
        self.config = config
        self.q = quant_config(config)
        self.method: Any = self.q.get("quant_method") if self.q else None
        self.found = Found()

    @property
    def where(self) -> str:
        return self.config.where if self.config is not None else "config.json"

    def refuse(self, what: str) -> Refusal:
        return refuse(self.src, what)

    def absent(self) -> Refusal:
        """The refusal of a config whose quant_method promises quantized tensors when none was found."""
        return self.refuse(f"{self.where} says quant_method {self.method!r}, but no tensor is stored in that layout")

    def add(self, name: str, codec: Codec, hide: Sequence[str]) -> None:
        """Record the quantized weight ``name`` made by ``codec``, its stored parts ``hide`` hidden."""
        found = self.found
        if (name in self.infos and name not in hide) or name in self.src.tied or name in found.codecs:
            raise self.refuse(
                f"tensor {name!r} is stored beside the quantized parts that make the weight of that "
                "name, so one would hide the other; remove one of them",
            )
        found.codecs[name] = codec
        found.hidden.update(hide)
        found.formats[codec.fmt] = found.formats.get(codec.fmt, 0) + 1

    def expect(self, fmt_method: set[str], what: str, name: str) -> None:
        """Refuse when config.json names a quant_method other than ``fmt_method`` for a tensor stored as ``what``."""
        if self.method is not None and self.method not in fmt_method:
            where, method = self.where, self.method
            raise self.refuse(f"{where} says quant_method {method!r}, but tensor {name!r} is stored as {what}")


class Format:
    """One family of quantized layouts, as ``recognise.FORMATS`` tries it. A subclass says which stored tensor a
    weight is found from (:meth:`anchors`), builds its codec (:meth:`recognise`), and names its parts for the rules
    that run on every tensor (orphans, ``--as-stored`` notes, whether config.json is needed)."""

    #: config.json quant_method values whose tensors this format reads
    methods: frozenset[str] = frozenset()
    #: quant_method values that promise tensors of this format: a config naming one with none of them is refused
    promised: frozenset[str] = frozenset()
    #: last name parts only ever found in this format's quantized weights (a lone one is an orphan)
    part_tails: frozenset[str] = frozenset()
    #: last name parts noted as raw storage under ``--as-stored``
    stored_tails: frozenset[str] = frozenset()
    #: tried in a second pass over the tensors the first pass left (a layout whose anchor another format may own)
    late: bool = False

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        """Whether ``name`` is the stored part this format recognises a quantized weight from."""
        raise NotImplementedError

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        """``ctx.add`` the weight anchored at ``name``, or raise a :class:`Refusal` saying why it cannot be read."""
        raise NotImplementedError

    def suspect(self, name: str) -> bool:
        """Whether ``name`` looks like a part of this format (config.json is then read to recognise it)."""
        return tail(name) in self.part_tails

    def orphan(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        """Whether ``name``, not hidden by any weight found, is a part of this format left without its weight."""
        return tail(name) in self.part_tails

    def stored_part(self, name: str, infos: Mapping[str, TensorInfo]) -> bool:
        """Whether ``name`` is quantized storage, noted as compared raw under ``--as-stored``."""
        return tail(name) in self.stored_tails

    def finish(self, ctx: Recognition) -> None:
        """Rules on the config once every tensor was seen: by default, a quant_method that promises this format's
        tensors when no quantized weight was found is refused."""
        if ctx.method in self.promised and not ctx.found.codecs:
            raise ctx.absent()
