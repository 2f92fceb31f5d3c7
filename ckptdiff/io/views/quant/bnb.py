"""bitsandbytes (4-bit NF4/FP4, LLM.int8): its codecs and how its weights are found.

- ``bnb-nf4`` / ``bnb-fp4`` (4-bit): ``weight`` packed bytes, the first code in the high nibble, of the flattened
  weight; ``weight.absmax`` one scale per ``blocksize`` entries (nested: U8 codes of a second, 256-entry table,
  ``nested_quant_map[a] · nested_absmax[b // nested_blocksize] + nested_offset``); ``weight.quant_map`` the 16
  values; ``weight.quant_state.bitsandbytes__nf4`` a JSON state (shape, blocksize, ...).
  ``W = quant_map[code] · absmax[k // blocksize]``.
- ``bnb-int8`` (LLM.int8): ``weight`` I8 with ``SCB`` one scale per row: ``W = q · SCB[row] / 127``.

Two formats: :data:`FOUR_BIT` (found from the quant state) and :data:`INT8` (found from ``SCB``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views.quant.base import (
    Codec,
    Format,
    HeaderOnly,
    Reader,
    Recognition,
    as_int,
    f64,
    read_small,
    refuse,
    rows_of,
    small_ints,
    split_nibbles,
    tail,
)

_STATE_MAX = 1 << 16  # bytes of a bitsandbytes quant_state JSON


@dataclass(frozen=True)
class BnbInt8(Codec):
    """LLM.int8: int8 codes and one absmax per row (SCB): W = q · SCB[row] / 127."""

    @property
    def label(self) -> str:
        return "int8/row"

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        q = rows_of(src, self.need("weight"), r0, r1)
        scb = f64(src.inner.read(self.need("scb").name, r0, r1 - r0)).reshape(-1, 1)
        return (q.to(torch.float64) * scb / 127.0).to(torch.float32).reshape(-1)

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        return rows_of(src, self.need("weight"), r0, r1).reshape(-1)

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        return f64(src.inner.read(self.need("scb").name, r0, r1 - r0)).reshape(-1, 1)


@dataclass(frozen=True)
class Bnb4(Codec):
    """bitsandbytes NF4/FP4: the flattened weight in blocks of ``blocksize``, two codes a byte, high nibble first."""

    quant_type: str = "nf4"
    blocksize: int = 64
    nested_blocksize: int = 256
    nested_offset: float = 0.0

    @property
    def label(self) -> str:
        nested = "+nested" if self.part("nested_absmax") is not None else ""
        return f"{self.quant_type}/{self.blocksize}{nested}"

    def _bytes(self, src: Reader, b0: int, b1: int) -> torch.Tensor:
        info = self.need("weight")
        if info.dtype.itemsize == 1:
            return src.inner.read(info.name, b0, b1 - b0).view(torch.uint8)
        return src.whole(info).reshape(-1).view(torch.uint8)[b0:b1]

    def absmax(self, src: Reader, k0: int, k1: int) -> torch.Tensor:
        """fp32 absmax of blocks [k0, k1), nested ones dequantized in fp32 as bitsandbytes does."""
        am = self.need("absmax")
        raw = src.inner.read(am.name, k0, k1 - k0)
        nested = self.part("nested_absmax")
        if nested is None:
            return raw.to(torch.float32)
        nmap = src.whole(self.need("nested_quant_map")).to(torch.float32).reshape(-1)
        nbs = self.nested_blocksize
        outer = src.inner.read(nested.name, k0 // nbs, (k1 - 1) // nbs - k0 // nbs + 1).to(torch.float32)
        idx = torch.arange(k0, k1) // nbs - k0 // nbs
        return nmap[raw.to(torch.int64)] * outer[idx] + torch.tensor(self.nested_offset, dtype=torch.float32)

    def _nibbles(self, src: Reader, f0: int, f1: int) -> torch.Tensor:
        """uint8 codes of flat entries [f0, f1): two a byte, the high nibble first."""
        packed = self._bytes(src, f0 // 2, -(-f1 // 2))
        return split_nibbles(packed, low_first=False).reshape(-1)[f0 % 2 : f0 % 2 + f1 - f0]

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        f0, f1 = r0 * self.row_len, r1 * self.row_len
        nib = self._nibbles(src, f0, f1)
        qmap = src.whole(self.need("quant_map")).to(torch.float32).reshape(-1)
        bs = self.blocksize
        k0, k1 = f0 // bs, (f1 - 1) // bs + 1
        am = self.absmax(src, k0, k1)  # fp32
        return qmap[nib.to(torch.int32)] * am.repeat_interleave(bs)[f0 - k0 * bs : f1 - k0 * bs]

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0 * self.row_len, r1 * self.row_len)
        qmap = src.whole(self.need("quant_map")).to(torch.float32).reshape(-1)
        zero = (qmap == 0).nonzero().reshape(-1).to(torch.uint8)
        if zero.numel() > 1:  # a table with +0 and −0: one value, one code
            nib = torch.where(torch.isin(nib, zero), zero[0], nib)
        return nib

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        per, bs = self.row_len, self.blocksize
        f0, f1 = r0 * per, r1 * per
        if f1 <= f0:
            return torch.empty(0, 1, dtype=torch.float64)
        return self.absmax(src, f0 // bs, (f1 - 1) // bs + 1).to(torch.float64).reshape(-1, 1)


def _bnb_state(src: Source, info: TensorInfo) -> dict[str, Any]:
    if info.dtype.name != "U8" or info.numel > _STATE_MAX:
        raise refuse(src, f"{info.name!r} is not a bitsandbytes quant state (a short U8 JSON tensor)")
    raw = bytes(read_small(src, info).numpy().tobytes())
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise refuse(src, f"{info.name!r} does not hold the JSON a bitsandbytes quant state is") from None
    if not isinstance(data, dict):
        raise refuse(src, f"{info.name!r} does not hold a JSON object")
    return data


class FourBitFormat(Format):
    """``P.weight`` + ``.absmax`` + ``.quant_map`` + ``.quant_state.bitsandbytes__nf4|fp4`` [+ nested absmax]."""

    methods = frozenset({"bitsandbytes"})
    promised = frozenset({"bitsandbytes"})
    part_tails = frozenset({"absmax", "quant_map", "nested_absmax", "nested_quant_map"})
    stored_tails = part_tails

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return ".weight.quant_state.bitsandbytes__" in name

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        infos = ctx.infos
        p = name.split(".quant_state.", 1)[0]  # P.weight
        qtype = name.rsplit("__", 1)[1]
        ctx.expect({"bitsandbytes"}, "bitsandbytes 4-bit", name)
        weight, absmax, qmap = infos.get(p), infos.get(p + ".absmax"), infos.get(p + ".quant_map")
        if qtype not in ("nf4", "fp4") or weight is None or absmax is None or qmap is None or qmap.numel != 16:
            raise ctx.refuse(f"{name!r}: a bitsandbytes {qtype} state without its weight, absmax or 16-entry quant_map")
        state = _bnb_state(ctx.src, infos[name])
        got = state.get("shape")
        dims4: list[int] = got if isinstance(got, list) else []
        bs = as_int(state.get("blocksize"))
        ok_shape = 1 <= len(dims4) <= 8 and all(type(d) is int and d >= 0 for d in dims4)
        if not ok_shape or not bs or bs < 1:
            raise ctx.refuse(f"{name!r} has no usable shape and blocksize")
        n = math.prod(dims4)
        if weight.nbytes != -(-n // 2) or absmax.numel != -(-n // bs):
            raise ctx.refuse(
                f"{p!r} holds {weight.nbytes} bytes and {absmax.numel} absmax for shape {dims4} "
                f"in blocks of {bs}; the quant state contradicts the tensors",
            )
        parts = [("weight", weight), ("absmax", absmax), ("quant_map", qmap)]
        hide = [p, p + ".absmax", p + ".quant_map", name]
        nested = infos.get(p + ".nested_absmax")
        nbs, off = 256, 0.0
        if nested is not None:
            nmap = infos.get(p + ".nested_quant_map")
            nbs_v = as_int(state.get("nested_blocksize"))
            off_v = state.get("nested_offset")
            if nmap is None or not nbs_v or not isinstance(off_v, (int, float)) or absmax.dtype.name != "U8":
                raise ctx.refuse(f"{p!r}: nested absmax without its quant map, blocksize, offset or U8 codes")
            if nested.numel != -(-absmax.numel // nbs_v) or nmap.numel != 256:
                raise ctx.refuse(f"{p!r}: nested absmax shape does not fit its blocksize")
            nbs, off = nbs_v, float(off_v)
            parts += [("nested_absmax", nested), ("nested_quant_map", nmap)]
            hide += [nested.name, nmap.name]
        elif not absmax.dtype.is_float:
            raise ctx.refuse(f"{absmax.name!r} is {absmax.dtype.short} without a nested_absmax")
        ctx.add(
            p,
            Bnb4(
                f"bnb-{qtype}",
                tuple(dims4),
                tuple(parts),
                quant_type=qtype,
                blocksize=bs,
                nested_blocksize=nbs,
                nested_offset=off,
            ),
            hide,
        )

    def suspect(self, name: str) -> bool:
        return ".quant_state." in name or super().suspect(name)

    def stored_part(self, name: str, infos: Mapping[str, TensorInfo]) -> bool:
        return (
            super().stored_part(name, infos)
            or ".quant_state." in name
            or (tail(name) == "weight" and name + ".absmax" in infos)
        )


class Int8Format(Format):
    """LLM.int8: ``S.weight`` I8 + ``S.SCB`` [+ ``S.weight_format``]."""

    methods = frozenset({"bitsandbytes"})
    promised = frozenset({"bitsandbytes"})
    part_tails = frozenset({"SCB", "weight_format"})
    stored_tails = part_tails

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return name.endswith(".SCB")

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        infos = ctx.infos
        stem = name[: -len(".SCB")]
        weight = infos.get(stem + ".weight")
        ctx.expect({"bitsandbytes"}, "bitsandbytes LLM.int8", name)
        if weight is None or weight.dtype.name != "I8" or len(weight.shape) != 2 or info.numel != weight.shape[0]:
            raise ctx.refuse(f"{name!r}: LLM.int8 row scales without an int8 matrix of as many rows")
        hide = [name, stem + ".weight"]
        fmt_t = infos.get(stem + ".weight_format")
        if fmt_t is not None:
            try:
                layout = small_ints(ctx.src, fmt_t)
            except HeaderOnly:  # headers alone: the shape is the int8 matrix's, whatever the layout
                layout = [0]
            if layout not in ([0], []):
                raise ctx.refuse(f"{fmt_t.name!r}: LLM.int8 weights in a tiled (col32/turing/ampere) layout")
            hide.append(fmt_t.name)
        ctx.add(stem + ".weight", BnbInt8("bnb-int8", weight.shape, (("weight", weight), ("scb", info))), hide)

    def stored_part(self, name: str, infos: Mapping[str, TensorInfo]) -> bool:
        return super().stored_part(name, infos) or (tail(name) == "weight" and name[: -len("weight")] + "SCB" in infos)


FOUR_BIT = FourBitFormat()
INT8 = Int8Format()
