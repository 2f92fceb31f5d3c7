"""Quantized checkpoints read as values: MXFP4, compressed-tensors, bitsandbytes, GPTQ and AWQ weights dequantized.

Each quantized weight is stored as several tensors (packed codes, scales, zero points, a quant map, a state) under
names of its own. :func:`wrap` recognises every such layout from tensor names, dtypes and ``config.json``'s
``quantization_config``, and presents each quantized weight as one fp32 tensor (:class:`QuantInfo`) in its logical
shape, under the name the unquantized checkpoint gives it (``mlp.experts.gate_up_proj``, ``q_proj.weight``), so a
quantized base pairs with its bf16 fine-tune. The parts are hidden: they are not parameters, so they are out of
``numel`` and every rollup. The formats and their formulas (docs/formats.md says the same for users):

- ``mxfp4`` (gpt-oss experts; transformers' mxfp4 integration): ``P_blocks`` U8 ``(E, R, G, 16)``, two FP4 E2M1
  codes per byte, the low nibble first, and ``P_scales`` U8 ``(E, R, G)``, an E8M0 exponent per 32 codes.
  ``P[e]`` is the transpose of the ``(R, 32·G)`` matrix ``fp4(code) · 2^(scale − 127)``.
- ``ct-int`` (compressed-tensors ``pack-quantized``, W4A16/W8A16): ``weight_packed`` I32 ``(out, ⌈in/p⌉)`` with
  p = 32/bits codes per word, the first column in the lowest bits, each code stored as ``q + 2^(bits−1)``;
  ``weight_scale`` per tensor, channel ``(out, 1)`` or group ``(out, G)``; ``weight_zero_point`` (asymmetric)
  packed the same way along the rows; ``weight_shape`` the logical shape; ``weight_g_idx`` act-order groups.
  ``W = (q − z) · s``.
- ``ct-float`` / ``ct-int8`` (compressed-tensors ``float-quantized``/``naive-quantized``, also ModelOpt and
  fbgemm FP8): ``weight`` F8_E4M3 or I8 beside ``weight_scale`` (per tensor, channel, group, or block with
  ``block_structure``) and optional ``weight_zero_point``; ``W = (q − z) · s``; ``input_scale`` is an activation
  scale, hidden.
- ``bnb-nf4`` / ``bnb-fp4`` (bitsandbytes 4-bit): ``weight`` packed bytes, the first code in the high nibble, of
  the flattened weight; ``weight.absmax`` one scale per ``blocksize`` entries (nested: U8 codes of a second, 256-entry
  table, ``nested_quant_map[a] · nested_absmax[b // nested_blocksize] + nested_offset``); ``weight.quant_map`` the
  16 values; ``weight.quant_state.bitsandbytes__nf4`` a JSON state (shape, blocksize, ...).
  ``W = quant_map[code] · absmax[k // blocksize]``.
- ``bnb-int8`` (LLM.int8): ``weight`` I8 with ``SCB`` one scale per row: ``W = q · SCB[row] / 127``.
- ``gptq``: ``qweight`` I32 ``(in·bits/32, out)`` packed along the input (row i in word i·bits/32, bits
  ``bits·(i mod 32/bits)`` up), ``qzeros`` ``(G, out·bits/32)`` packed along the output, ``scales`` ``(G, out)``,
  ``g_idx`` the group of each input (act-order); ``W[o, i] = s[g(i), o] · (q[i, o] − z[g(i), o] − 1)`` for the
  ``gptq`` checkpoint format (the zeros are stored minus one), without the −1 for ``gptq_v2``.
- ``awq`` (GEMM): ``qweight`` ``(in, out/8)`` with the interleaved order (column 8k + j in nibble
  ``[0, 4, 1, 5, 2, 6, 3, 7][j]``), ``qzeros`` alike, ``scales`` ``(G, out)``: ``W[o, i] = s[i // gs, o] ·
  (q[i, o] − z[i // gs, o])``.

Every value is computed once in float64 from the stored numbers and rounded once to fp32 (the libraries form the
product in the scale's dtype, often bf16: their result is this value rounded again). An entry is changed iff its
dequantized value changed. :class:`Stats` gives the sparsity rows ``codes_changed`` (logical codes that changed;
a float code's zero keeps its value whatever its sign) and ``scale_blocks_changed`` (scale groups whose scale or zero
point changed), the columns the block-scaled FP8 view fills.

Never a silent raw comparison: a layout recognised but not implemented here, or a ``config.json`` that contradicts the
tensors, is an :class:`~ckptdiff.errors.InputError` naming the tensor and the reason, with the hint ``--as-stored``.
Under :func:`as_stored` (the ``--as-stored`` option) nothing is dequantized: every stored part is compared as it
is, each with a note saying so, and the header says so.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptdiff import dtypes
from ckptdiff.errors import InputError
from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views import config as model_config
from ckptdiff.io.views import fp8
from ckptdiff.io.views.config import ModelConfig

F32 = dtypes.BY_NAME["F32"]
HINT = "pass --as-stored to compare the stored tensors as they are, on purpose"
PIECE = 1 << 22  # logical entries dequantized at a time (at least one row)
_PURPOSE = "its quantization_config to dequantize the quantized weights"
_STATE_MAX = 1 << 16  # bytes of a bitsandbytes quant_state JSON
_KEPT = 4  # stored tensors kept whole per source (GPTQ/AWQ are unpacked whole)

_AS_STORED: ContextVar[bool] = ContextVar("ckptdiff_as_stored", default=False)


@contextmanager
def as_stored(on: bool = True) -> Iterator[None]:
    """Within this block, checkpoints opened are compared as stored: nothing dequantized (``--as-stored``)."""
    token = _AS_STORED.set(on)
    try:
        yield
    finally:
        _AS_STORED.reset(token)


def stored_wanted() -> bool:
    """Whether the comparison is of stored tensors, on purpose (``--as-stored``)."""
    return _AS_STORED.get()


# ---------------------------------------------------------------------------------------------
# the logical tensor


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


def _split_nibbles(packed: torch.Tensor, low_first: bool) -> torch.Tensor:
    """uint8 bytes (..., k) -> uint8 codes (..., k, 2): each byte's two nibbles, in the format's order."""
    out = torch.empty(*packed.shape, 2, dtype=torch.uint8)
    lo, hi = (0, 1) if low_first else (1, 0)
    torch.bitwise_and(packed, 0x0F, out=out[..., lo])
    torch.bitwise_right_shift(packed, 4, out=out[..., hi])
    return out


def _f64(t: torch.Tensor) -> torch.Tensor:
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

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        """The fp32 values of logical rows [r0, r1), flat, row-major."""
        raise NotImplementedError

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        """The codes of logical rows [r0, r1), flat, row-major, one per entry (a float code's −0 as its +0)."""
        raise NotImplementedError

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        """The scale groups that rows [r0, r1) use, one row each: (scale[, zero point]) as float64."""
        raise NotImplementedError


def _rows_of(src: QuantSource, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) along the first dimension of a stored tensor, in its stored shape."""
    per = math.prod(info.shape[1:])
    flat = src.inner.read(info.name, r0 * per, (r1 - r0) * per)
    return flat.reshape(r1 - r0, *info.shape[1:])


def _groups_of(src: QuantSource, g_idx: TensorInfo, n_groups: int) -> torch.Tensor:
    """The group of every input column, from an act-order ``g_idx``; InputError when one names no group."""
    g = src.whole(g_idx).to(torch.int64).reshape(-1)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise InputError(
            f"{src.spec}: {g_idx.name!r} names group {int(g.max()) if int(g.max()) >= n_groups else int(g.min())}, "
            f"but the weight has {n_groups} scale groups; the checkpoint is corrupt: re-download or re-export it"
        )
    return g


def _fdt(*infos: TensorInfo | None) -> torch.dtype:
    """The dtype a value is formed in: fp32, whose one multiply of two exact fp32 numbers rounds the exact product
    once, as float64 then a cast would; float64 where a part (an F64 scale) is not an fp32 number."""
    return torch.float64 if any(i is not None and i.dtype.name == "F64" for i in infos) else torch.float32


def _scale_rows(src: QuantSource, scale: TensorInfo, r0: int, r1: int, out_rows: int) -> torch.Tensor:
    """The (r1 − r0, G) float64 scales of rows [r0, r1): per tensor (one value), or per row."""
    if scale.numel == 1:
        return _f64(src.inner.read(scale.name)).reshape(1, 1).expand(r1 - r0, 1)
    return _f64(_rows_of(src, scale, r0, r1)).reshape(r1 - r0, -1)


# --- MXFP4 ----------------------------------------------------------------------------------------

FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4 = torch.tensor(FP4_E2M1, dtype=torch.float32)


def e8m0(exps: torch.Tensor) -> torch.Tensor:
    """fp32 2^(e − 127) of E8M0 exponents, built from its bits (exact: 2^−127 is an fp32 subnormal); 255 is NaN
    (the OCP microscaling definition)."""
    e = exps.to(torch.int32)
    bits = torch.where(e == 0, 1 << 22, e << 23)
    bits = torch.where(e == 255, 0x7FC00000, bits)
    return bits.view(torch.float32)


@dataclass(frozen=True)
class Mxfp4(Codec):
    """gpt-oss MXFP4 experts: logical (E, 32·G, R), the transpose of each expert's (R, 32·G) dequantized blocks."""

    @property
    def label(self) -> str:
        return "mxfp4/32"

    def _nibbles(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        """(n, R, G, 32) uint8 codes, the low nibble of each byte first."""
        blocks = _rows_of(src, self.need("blocks"), r0, r1)  # (n, R, G, 16) uint8
        return _split_nibbles(blocks, low_first=True).reshape(*blocks.shape[:-1], 32)

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0, r1)
        n, rr, g, _ = nib.shape
        # each product of a code value and a power of two rounds once in fp32: the exact value, rounded once
        values = _FP4[nib.to(torch.int32)] * e8m0(_rows_of(src, self.need("scales"), r0, r1)).unsqueeze(-1)
        return values.reshape(n, rr, g * 32).transpose(1, 2).reshape(-1)

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0, r1)
        n, rr, g, _ = nib.shape
        nib = torch.where(nib == 8, 0, nib)  # −0 is +0
        return nib.reshape(n, rr, g * 32).transpose(1, 2).reshape(-1)

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        return _f64(_rows_of(src, self.need("scales"), r0, r1)).reshape(-1, 1)


# --- integer codes with scales and zero points, one row per output (compressed-tensors) -------------


def _unpack_rows(words: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """(rows, ⌈width·bits/32⌉) int32 words -> (rows, width) unsigned codes, the first in the lowest bits."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # the mask drops the sign fill
    return codes.to(torch.uint8).reshape(words.shape[0], -1)[:, :width]


@dataclass(frozen=True)
class CtInt(Codec):
    """compressed-tensors pack-quantized: signed int codes packed into int32 words along each row."""

    bits: int = 4
    group: int = 0  # input columns per scale group (0: one group per row, channel or tensor scale)
    block: tuple[int, int] | None = None  # unused here; for the float variant

    @property
    def label(self) -> str:
        g = f"/g{self.group}" if self.group else ""
        return f"int{self.bits}{g}"

    def _cols_group(self, src: QuantSource, n_groups: int) -> torch.Tensor:
        cols = self.shape[1]
        g_idx = self.part("g_idx")
        if g_idx is not None:
            return _groups_of(src, g_idx, n_groups)
        if n_groups <= 1:
            return torch.zeros(cols, dtype=torch.int64)
        return torch.arange(cols, dtype=torch.int64) // self.group

    def _codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        words = _rows_of(src, self.need("packed"), r0, r1)
        return _unpack_rows(words, self.bits, self.shape[1]).to(torch.int16) - (1 << (self.bits - 1))

    def _zeros(self, src: QuantSource, r0: int, r1: int, n_groups: int) -> torch.Tensor | None:
        plain = self.part("zero_point_plain")  # one signed integer per scale (older compressed-tensors)
        if plain is not None:
            return _rows_of(src, plain, r0, r1).to(torch.float64).reshape(r1 - r0, -1)
        zp = self.part("zero_point")
        if zp is None:
            return None
        per = 32 // self.bits
        words = _rows_of(src, zp, r0 // per, -(-r1 // per))  # (⌈⌉, G): rows packed along dim 0
        w = words.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per, dtype=torch.int64) * self.bits
        z = (w.unsqueeze(1) >> shifts.reshape(1, per, 1)) & ((1 << self.bits) - 1)  # (⌈⌉, per, G)
        z = z.reshape(-1, z.shape[-1]) - (1 << (self.bits - 1))
        first = (r0 // per) * per
        return z[r0 - first : r1 - first].to(torch.float64)

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        q = self._codes(src, r0, r1)
        s = _scale_rows(src, self.need("scale"), r0, r1, self.shape[0])
        col_g = self._cols_group(src, s.shape[1])
        z = self._zeros(src, r0, r1, s.shape[1])
        dt = _fdt(self.need("scale"))
        qf = q.to(dt)
        if z is not None:
            qf = qf - z.to(dt)[:, col_g]  # small integers: exact
        return (qf * s.to(dt)[:, col_g]).to(torch.float32).reshape(-1)

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        return self._codes(src, r0, r1).reshape(-1)

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        s = _scale_rows(src, self.need("scale"), r0, r1, self.shape[0])
        if self.need("scale").numel == 1:
            s = s[:1]
        z = self._zeros(src, r0, r1, s.shape[1])
        if z is None:
            return s.reshape(-1, 1)
        return torch.stack((s.reshape(-1), z.reshape(-1)), dim=1)


@dataclass(frozen=True)
class CtFloat(Codec):
    """Unpacked codes (FP8 E4M3 or int8) with a scale per tensor, channel, group or block and an optional zero point."""

    group: int = 0
    block: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        code = self.need("weight").dtype.short
        if self.block is not None:
            return f"{code}/{self.block[0]}x{self.block[1]}"
        scale = self.need("scale")
        if scale.numel == 1:
            return f"{code}/tensor"
        return f"{code}/g{self.group}" if self.group else f"{code}/channel"

    def _scales(self, src: QuantSource, role: str, r0: int, r1: int) -> torch.Tensor:
        """(r1 − r0, n) float64 scale (or zero point) of every entry of rows [r0, r1)."""
        info = self.need(role)
        cols = self.shape[1]
        if info.numel == 1:
            return _f64(src.inner.read(info.name)).reshape(1, 1).expand(r1 - r0, cols)
        if self.block is not None:
            b0, b1 = self.block
            s = _f64(_rows_of(src, info, r0 // b0, (r1 - 1) // b0 + 1))
            rows = torch.arange(r0, r1) // b0 - r0 // b0
            return s[rows][:, torch.arange(cols) // b1]
        s = _f64(_rows_of(src, info, r0, r1)).reshape(r1 - r0, -1)
        if s.shape[1] == 1:
            return s.expand(r1 - r0, cols)
        return s[:, torch.arange(cols) // self.group]

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        raw = _rows_of(src, self.need("weight"), r0, r1)
        zp = self.part("zero_point")
        dt = torch.float64 if zp is not None else _fdt(self.need("scale"))  # q − z is exact in float64
        qf = raw.to(dt)
        if zp is not None:
            qf = qf - self._scales(src, "zero_point", r0, r1)
        return (qf * self._scales(src, "scale", r0, r1).to(dt)).to(torch.float32).reshape(-1)

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        raw = _rows_of(src, self.need("weight"), r0, r1)
        if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            bits = raw.view(torch.uint8)
            return torch.where((bits & 0x7F) == 0, 0, bits).reshape(-1)  # −0 is +0
        return raw.reshape(-1)

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        scale = self.need("scale")
        if scale.numel == 1:
            s = _f64(src.inner.read(scale.name)).reshape(1, 1)
        elif self.block is not None:
            s = _f64(_rows_of(src, scale, r0 // self.block[0], (r1 - 1) // self.block[0] + 1)).reshape(-1, 1)
        else:
            s = _f64(_rows_of(src, scale, r0, r1)).reshape(-1, 1)
        zp = self.part("zero_point")
        if zp is None:
            return s
        if zp.numel == 1:
            z = _f64(src.inner.read(zp.name)).reshape(1, 1)
        elif self.block is not None:
            z = _f64(_rows_of(src, zp, r0 // self.block[0], (r1 - 1) // self.block[0] + 1)).reshape(-1, 1)
        else:
            z = _f64(_rows_of(src, zp, r0, r1)).reshape(-1, 1)
        return torch.cat((s, z), dim=1)


# --- bitsandbytes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BnbInt8(Codec):
    """LLM.int8: int8 codes and one absmax per row (SCB): W = q · SCB[row] / 127."""

    @property
    def label(self) -> str:
        return "int8/row"

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        q = _rows_of(src, self.need("weight"), r0, r1)
        scb = _f64(src.inner.read(self.need("scb").name, r0, r1 - r0)).reshape(-1, 1)
        return (q.to(torch.float64) * scb / 127.0).to(torch.float32).reshape(-1)

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        return _rows_of(src, self.need("weight"), r0, r1).reshape(-1)

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        return _f64(src.inner.read(self.need("scb").name, r0, r1 - r0)).reshape(-1, 1)


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

    def _bytes(self, src: QuantSource, b0: int, b1: int) -> torch.Tensor:
        info = self.need("weight")
        if info.dtype.itemsize == 1:
            return src.inner.read(info.name, b0, b1 - b0).view(torch.uint8)
        return src.whole(info).reshape(-1).view(torch.uint8)[b0:b1]

    def absmax(self, src: QuantSource, k0: int, k1: int) -> torch.Tensor:
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

    def _nibbles(self, src: QuantSource, f0: int, f1: int) -> torch.Tensor:
        """uint8 codes of flat entries [f0, f1): two a byte, the high nibble first."""
        packed = self._bytes(src, f0 // 2, -(-f1 // 2))
        return _split_nibbles(packed, low_first=False).reshape(-1)[f0 % 2 : f0 % 2 + f1 - f0]

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        f0, f1 = r0 * self.row_len, r1 * self.row_len
        nib = self._nibbles(src, f0, f1)
        qmap = src.whole(self.need("quant_map")).to(torch.float32).reshape(-1)
        bs = self.blocksize
        k0, k1 = f0 // bs, (f1 - 1) // bs + 1
        am = self.absmax(src, k0, k1)  # fp32
        return qmap[nib.to(torch.int32)] * am.repeat_interleave(bs)[f0 - k0 * bs : f1 - k0 * bs]

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0 * self.row_len, r1 * self.row_len)
        qmap = src.whole(self.need("quant_map")).to(torch.float32).reshape(-1)
        zero = (qmap == 0).nonzero().reshape(-1).to(torch.uint8)
        if zero.numel() > 1:  # a table with +0 and −0: one value, one code
            nib = torch.where(torch.isin(nib, zero), zero[0], nib)
        return nib

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        per, bs = self.row_len, self.blocksize
        f0, f1 = r0 * per, r1 * per
        if f1 <= f0:
            return torch.empty(0, 1, dtype=torch.float64)
        return self.absmax(src, f0 // bs, (f1 - 1) // bs + 1).to(torch.float64).reshape(-1, 1)


# --- GPTQ / AWQ: packed across rows of the transposed weight, unpacked whole ----------------------

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column 8k + j sits in nibble AWQ_ORDER[j] of word k


@dataclass(frozen=True)
class Gptq(Codec):
    """GPTQ (``awq=False``) or AWQ GEMM packing; logical (out, in), the transpose of the stored (in, out)."""

    bits: int = 4
    group: int = 128  # inputs per group; 0 when one group covers every input
    plus_one: bool = True  # GPTQ v1 stores zeros minus one
    awq: bool = False

    @property
    def label(self) -> str:
        g = f"/g{self.group}" if self.group else ""
        return f"{'awq' if self.awq else 'gptq'}-int{self.bits}{g}"

    def _unpack_out(self, words: torch.Tensor, width: int) -> torch.Tensor:
        """(r, ⌈width·bits/32⌉) words packed along the output -> (r, width) codes."""
        codes = _unpack_rows(words, self.bits, words.shape[1] * (32 // self.bits))
        if self.awq:
            order = torch.tensor(AWQ_ORDER)
            cols = torch.arange(codes.shape[1]).reshape(-1, 8)
            codes = codes[:, (cols[:, :1] + order).reshape(-1)]
        return codes[:, :width]

    def _qweight(self, src: QuantSource) -> torch.Tensor:
        """(in, out) unsigned codes."""
        out_f, in_f = self.shape
        words = src.whole(self.need("qweight"))
        if self.awq:
            return self._unpack_out(words, out_f)
        per = 32 // self.bits
        shifts = torch.arange(per, dtype=torch.int32) * self.bits
        codes = (words.to(torch.int32).unsqueeze(1) >> shifts.reshape(1, per, 1)) & ((1 << self.bits) - 1)
        return codes.to(torch.uint8).reshape(-1, out_f)[:in_f]

    def _g(self, src: QuantSource) -> torch.Tensor:
        in_f = self.shape[1]
        g_idx = self.part("g_idx")
        if g_idx is not None and not self.awq:
            return _groups_of(src, g_idx, self.need("scales").shape[0])
        if not self.group:
            return torch.zeros(in_f, dtype=torch.int64)
        return torch.arange(in_f) // self.group

    def _sz(self, src: QuantSource) -> tuple[torch.Tensor, torch.Tensor]:
        out_f = self.shape[0]
        s = _f64(src.whole(self.need("scales")))
        z = self._unpack_out(src.whole(self.need("qzeros")), out_f).to(torch.float64)
        return s, z + 1 if self.plus_one else z

    def _unpacked(self, src: QuantSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (in, out) uint8, scales, zeros (G, out) float64, group of each input), unpacked once per read
        of the tensor's chunks."""
        key = self.need("qweight").name
        hit = src.memo.get(key)
        if hit is None:
            s, z = self._sz(src)
            hit = (self._qweight(src).to(torch.uint8), s, z, self._g(src))
            src.remember(key, hit)
        return hit

    def values(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        q_all, s, z, g = self._unpacked(src)
        q = q_all[:, r0:r1]  # (in, rows)
        dt = _fdt(self.need("scales"))
        zs, ss = z[:, r0:r1].to(dt), s[:, r0:r1].to(dt)
        values = ((q.to(dt) - zs[g]) * ss[g]).to(torch.float32)  # q − z: small integers, exact
        return values.t().reshape(-1)

    def codes(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        return self._unpacked(src)[0][:, r0:r1].t().reshape(-1)

    def groups(self, src: QuantSource, r0: int, r1: int) -> torch.Tensor:
        _, s, z, _ = self._unpacked(src)
        return torch.stack((s[:, r0:r1].reshape(-1), z[:, r0:r1].reshape(-1)), dim=1)


# ---------------------------------------------------------------------------------------------
# recognising layouts


class Refusal(InputError):
    """A recognised quantized layout ckptdiff does not dequantize, or a config that contradicts the tensors."""


def _refuse(src: Source, what: str) -> Refusal:
    return Refusal(f"{src.spec}: {what}; {HINT}")


KNOWN_METHODS = {"fp8", "mxfp4", "compressed-tensors", "bitsandbytes", "gptq", "awq", "modelopt", "fbgemm_fp8"}
_INT_FMTS = {"pack-quantized", "naive-quantized", "int-quantized", "float-quantized", "mixed-precision"}


def _quant_config(config: ModelConfig | None) -> dict[str, Any]:
    if config is None:
        return {}
    q = config.data.get("quantization_config")
    return q if isinstance(q, dict) else {}


def _weights_args(q: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``weights`` quantization args of every compressed-tensors config group."""
    out = []
    groups = q.get("config_groups")
    if isinstance(groups, dict):
        for g in groups.values():
            w = g.get("weights") if isinstance(g, dict) else None
            if isinstance(w, dict):
                out.append(w)
    return out


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


@dataclass
class _Found:
    """What the headers show: quantized weights per format, their parts, and the tensors they hide."""

    codecs: dict[str, Codec] = field(default_factory=dict)  # logical name -> codec
    hidden: set[str] = field(default_factory=set)
    formats: dict[str, int] = field(default_factory=dict)  # format -> count


class _HeaderOnly(Refusal):
    """A part that says how to read a quantized weight, in a source opened header-only (no data can be read)."""


def _read_small(src: Source, info: TensorInfo) -> torch.Tensor:
    """A small part that says how to read a quantized weight (its shape, its state); a source opened header-only
    cannot read it, which is said in one line."""
    try:
        return src.read(info.name)
    except InputError as e:
        if "header-only" not in str(e):
            raise
        raise _HeaderOnly(
            f"{src.spec}: tensor {info.name!r} holds what a quantized weight's shape is, and --header-only reads no "
            f"tensor data; drop --header-only, or {HINT}"
        ) from None


def _small_ints(src: Source, info: TensorInfo) -> list[int]:
    if info.dtype.is_float or info.numel > 8:
        raise _refuse(
            src,
            f"tensor {info.name!r} should hold a few integers (a shape), holds {info.dtype.short} {list(info.shape)}",
        )
    return [int(v) for v in _read_small(src, info).tolist()]


def _bnb_state(src: Source, info: TensorInfo) -> dict[str, Any]:
    if info.dtype.name != "U8" or info.numel > _STATE_MAX:
        raise _refuse(src, f"{info.name!r} is not a bitsandbytes quant state (a short U8 JSON tensor)")
    raw = bytes(_read_small(src, info).numpy().tobytes())
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse(src, f"{info.name!r} does not hold the JSON a bitsandbytes quant state is") from None
    if not isinstance(data, dict):
        raise _refuse(src, f"{info.name!r} does not hold a JSON object")
    return data


def _recognise(src: Source, config: ModelConfig | None) -> _Found:
    infos = src.infos
    q = _quant_config(config)
    method = q.get("quant_method") if q else None
    found = _Found()

    def add(name: str, codec: Codec, hide: Sequence[str]) -> None:
        if (name in infos and name not in hide) or name in src.tied or name in found.codecs:
            raise _refuse(
                src,
                f"tensor {name!r} is stored beside the quantized parts that make the weight of that "
                "name, so one would hide the other; remove one of them",
            )
        found.codecs[name] = codec
        found.hidden.update(hide)
        found.formats[codec.fmt] = found.formats.get(codec.fmt, 0) + 1

    def expect(fmt_method: set[str], what: str, name: str) -> None:
        if method is not None and method not in fmt_method:
            where = config.where if config is not None else "config.json"
            raise _refuse(src, f"{where} says quant_method {method!r}, but tensor {name!r} is stored as {what}")

    if method is not None and method not in KNOWN_METHODS:
        where = config.where if config is not None else "config.json"
        raise _refuse(src, f"{where} says quant_method {method!r}, a quantization ckptdiff does not dequantize")

    for name, info in infos.items():
        # MXFP4: P_blocks + P_scales
        if name.endswith("_blocks") and info.dtype.name == "U8" and name[: -len("_blocks")] + "_scales" in infos:
            base = name[: -len("_blocks")]
            scales = infos[base + "_scales"]
            expect({"mxfp4"}, "MXFP4 blocks and scales", name)
            shape = info.shape
            if len(shape) != 4 or shape[-1] != 16 or scales.dtype.name != "U8" or tuple(scales.shape) != shape[:-1]:
                raise _refuse(
                    src,
                    f"MXFP4 tensor {name!r} {list(shape)} with scales {list(scales.shape)} is not "
                    "the (experts, rows, groups, 16) layout ckptdiff dequantizes",
                )
            if ".experts." not in f".{base}":
                raise _refuse(
                    src,
                    f"MXFP4 tensor {name!r} is not an expert stack (transformers dequantizes only "
                    "the experts' gate_up_proj/down_proj)",
                )
            logical = (shape[0], shape[2] * 32, shape[1])
            add(base, Mxfp4("mxfp4", logical, (("blocks", info), ("scales", scales))), (name, base + "_scales"))
            continue
        # compressed-tensors packed
        if name.endswith(".weight_packed"):
            p = name[: -len("_packed")]  # P.weight
            stem = name[: -len(".weight_packed")]
            expect({"compressed-tensors"}, "compressed-tensors packed codes", name)
            fmt = q.get("format") if q else None
            if info.dtype.name != "I32" or stem + ".weight_global_scale" in infos or fmt not in (None, *_INT_FMTS):
                raise _refuse(
                    src,
                    f"{name!r} is {info.dtype.short} packed codes of compressed-tensors format "
                    f"{fmt or 'nvfp4-pack-quantized'}, which ckptdiff does not dequantize",
                )
            shape_t = infos.get(p + "_shape")
            scale = infos.get(p + "_scale")
            if shape_t is None or scale is None or len(info.shape) != 2:
                raise _refuse(src, f"{name!r} lacks its weight_shape or weight_scale (or is not 2-D)")
            dims = _small_ints(src, shape_t)
            if len(dims) != 2:
                raise _refuse(src, f"{shape_t.name!r} holds {dims}, not a 2-D shape")
            out_f, in_f = dims
            args = _weights_args(q)
            bits_cfg = {nb for a in args if (nb := _int(a.get("num_bits"))) is not None}
            fits = [b for b in (4, 8, 2) if -(-in_f // (32 // b)) == info.shape[1]]
            bits_ok = [b for b in fits if not bits_cfg or b in bits_cfg]
            if len(bits_ok) != 1 or info.shape[0] != out_f:
                raise _refuse(
                    src,
                    f"{name!r} {list(info.shape)} does not fit weight_shape {dims} with num_bits "
                    f"{sorted(bits_cfg) or 'of 2, 4 or 8'}",
                )
            bits = bits_ok[0]
            g_cols = scale.shape[1] if len(scale.shape) == 2 else 1
            if scale.numel not in (1, out_f * g_cols) or (scale.numel != 1 and scale.shape[0] != out_f):
                raise _refuse(
                    src,
                    f"{scale.name!r} {list(scale.shape)} is not a tensor, channel or group scale of "
                    f"the {out_f}x{in_f} weight",
                )
            sizes = {gsz for a in args if (gsz := _int(a.get("group_size"))) is not None}
            group = 0
            if g_cols > 1:
                cands = [g for g in sizes if g and -(-in_f // g) == g_cols] or (
                    [] if sizes else [-(-in_f // g_cols)] if -(-in_f // -(-in_f // g_cols)) == g_cols else []
                )
                if len(cands) != 1:
                    raise _refuse(
                        src,
                        f"{scale.name!r} has {g_cols} groups, which no group_size of the config "
                        f"({sorted(sizes) or 'none'}) gives {in_f} inputs",
                    )
                group = cands[0]
            parts: list[tuple[str, TensorInfo]] = [("packed", info), ("scale", scale)]
            hide = [name, p + "_shape", p + "_scale"]
            zp = infos.get(p + "_zero_point")
            if zp is not None:
                packed_zp = zp.dtype.name == "I32" and tuple(zp.shape) == (-(-out_f // (32 // bits)), g_cols)
                plain_zp = zp.dtype.name in ("I8", "I16", "I32") and tuple(zp.shape) == (out_f, g_cols)
                if not (packed_zp or plain_zp) or (packed_zp and plain_zp):
                    raise _refuse(
                        src,
                        f"{zp.name!r} {zp.dtype.short} {list(zp.shape)} is neither the packed zero point "
                        "compressed-tensors writes nor one integer per scale",
                    )
                parts.append(("zero_point" if packed_zp else "zero_point_plain", zp))
                hide.append(zp.name)
            gi = infos.get(p + "_g_idx")
            if gi is not None:
                if gi.numel != in_f or gi.dtype.is_float:
                    raise _refuse(src, f"{gi.name!r} is not one group index per input")
                parts.append(("g_idx", gi))
                hide.append(gi.name)
            add(p, CtInt("ct-int", (out_f, in_f), tuple(parts), bits=bits, group=group), hide)
            continue
        # bitsandbytes 4-bit
        if ".weight.quant_state.bitsandbytes__" in name:
            p = name.split(".quant_state.", 1)[0]  # P.weight
            qtype = name.rsplit("__", 1)[1]
            expect({"bitsandbytes"}, "bitsandbytes 4-bit", name)
            weight, absmax, qmap = infos.get(p), infos.get(p + ".absmax"), infos.get(p + ".quant_map")
            if qtype not in ("nf4", "fp4") or weight is None or absmax is None or qmap is None or qmap.numel != 16:
                raise _refuse(
                    src, f"{name!r}: a bitsandbytes {qtype} state without its weight, absmax or 16-entry quant_map"
                )
            state = _bnb_state(src, infos[name])
            got = state.get("shape")
            dims4: list[int] = got if isinstance(got, list) else []
            bs = _int(state.get("blocksize"))
            ok_shape = 1 <= len(dims4) <= 8 and all(type(d) is int and d >= 0 for d in dims4)
            if not ok_shape or not bs or bs < 1:
                raise _refuse(src, f"{name!r} has no usable shape and blocksize")
            n = math.prod(dims4)
            if weight.nbytes != -(-n // 2) or absmax.numel != -(-n // bs):
                raise _refuse(
                    src,
                    f"{p!r} holds {weight.nbytes} bytes and {absmax.numel} absmax for shape {dims4} "
                    f"in blocks of {bs}; the quant state contradicts the tensors",
                )
            parts = [("weight", weight), ("absmax", absmax), ("quant_map", qmap)]
            hide = [p, p + ".absmax", p + ".quant_map", name]
            nested = infos.get(p + ".nested_absmax")
            nbs, off = 256, 0.0
            if nested is not None:
                nmap = infos.get(p + ".nested_quant_map")
                nbs_v = _int(state.get("nested_blocksize"))
                off_v = state.get("nested_offset")
                if nmap is None or not nbs_v or not isinstance(off_v, (int, float)) or absmax.dtype.name != "U8":
                    raise _refuse(src, f"{p!r}: nested absmax without its quant map, blocksize, offset or U8 codes")
                if nested.numel != -(-absmax.numel // nbs_v) or nmap.numel != 256:
                    raise _refuse(src, f"{p!r}: nested absmax shape does not fit its blocksize")
                nbs, off = nbs_v, float(off_v)
                parts += [("nested_absmax", nested), ("nested_quant_map", nmap)]
                hide += [nested.name, nmap.name]
            elif not absmax.dtype.is_float:
                raise _refuse(src, f"{absmax.name!r} is {absmax.dtype.short} without a nested_absmax")
            add(
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
            continue
        # bitsandbytes LLM.int8
        if name.endswith(".SCB"):
            stem = name[: -len(".SCB")]
            weight = infos.get(stem + ".weight")
            expect({"bitsandbytes"}, "bitsandbytes LLM.int8", name)
            if weight is None or weight.dtype.name != "I8" or len(weight.shape) != 2 or info.numel != weight.shape[0]:
                raise _refuse(src, f"{name!r}: LLM.int8 row scales without an int8 matrix of as many rows")
            hide = [name, stem + ".weight"]
            fmt_t = infos.get(stem + ".weight_format")
            if fmt_t is not None:
                try:
                    layout = _small_ints(src, fmt_t)
                except _HeaderOnly:  # headers alone: the shape is the int8 matrix's, whatever the layout
                    layout = [0]
                if layout not in ([0], []):
                    raise _refuse(src, f"{fmt_t.name!r}: LLM.int8 weights in a tiled (col32/turing/ampere) layout")
                hide.append(fmt_t.name)
            add(stem + ".weight", BnbInt8("bnb-int8", weight.shape, (("weight", weight), ("scb", info))), hide)
            continue
        # GPTQ / AWQ
        if name.endswith(".qweight"):
            stem = name[: -len(".qweight")]
            qz, sc = infos.get(stem + ".qzeros"), infos.get(stem + ".scales")
            if method not in ("gptq", "awq"):
                raise _refuse(
                    src,
                    f"{name!r} is GPTQ/AWQ packing, but config.json's quant_method is "
                    f"{method!r}: the packing order and bits are unknown",
                )
            if info.dtype.name != "I32" or qz is None or sc is None or len(info.shape) != 2 or len(sc.shape) != 2:
                raise _refuse(src, f"{name!r}: packed codes without int32 qzeros and 2-D scales")
            bits = _int(q.get("bits", q.get("w_bit"))) or 4
            awq = method == "awq"
            if 32 % bits or (awq and bits != 4) or (awq and str(q.get("version", "gemm")).lower() != "gemm"):
                raise _refuse(
                    src,
                    f"{name!r}: {method} with {bits} bits, version {q.get('version', '-')}: only "
                    "2/4/8-bit GPTQ and 4-bit AWQ GEMM are dequantized",
                )
            per = 32 // bits
            if awq:
                in_f, out_f = info.shape[0], info.shape[1] * per
            else:
                in_f, out_f = info.shape[0] * per, info.shape[1]
            gi = infos.get(stem + ".g_idx")
            if gi is not None and not awq:
                in_f = gi.numel
            gs = _int(q.get("group_size", q.get("q_group_size")))
            group = 0 if gs is None or gs <= 0 else gs
            n_groups = -(-in_f // group) if group else 1
            ok = sc.shape[1] == out_f and qz.shape[1] * per == out_f and qz.shape[0] == sc.shape[0]
            ok = ok and ((gi is not None and not awq) or sc.shape[0] == n_groups)
            if not ok:
                raise _refuse(
                    src,
                    f"{name!r} {list(info.shape)}, qzeros {list(qz.shape)}, scales {list(sc.shape)} "
                    f"do not fit {bits}-bit {method} with group_size {gs}: the config contradicts them",
                )
            fmt_ck = str(q.get("checkpoint_format", "gptq")).lower()
            parts = [("qweight", info), ("qzeros", qz), ("scales", sc)]
            hide = [name, qz.name, sc.name]
            if gi is not None:
                parts.append(("g_idx", gi))
                hide.append(gi.name)
            codec = Gptq(
                method,
                (out_f, in_f),
                tuple(parts),
                bits=bits,
                group=group,
                plus_one=not awq and fmt_ck == "gptq",
                awq=awq,
            )
            add(stem + ".weight", codec, hide)
            continue
    # unpacked codes with a weight_scale (compressed-tensors float/int, ModelOpt, fbgemm)
    for name, info in infos.items():
        if not name.endswith(".weight_scale") or name in found.hidden:
            continue
        p = name[: -len("_scale")]
        weight = infos.get(p)
        if weight is None or p in found.codecs:
            continue
        if not (fp8.is_fp8(weight) or weight.dtype.name == "I8"):
            continue
        scaled_methods = {"compressed-tensors", "modelopt", "fbgemm_fp8", "fp8"}
        expect(scaled_methods, f"{weight.dtype.short} codes with a weight_scale", p)
        if len(weight.shape) != 2:
            raise _refuse(src, f"{p!r} is {len(weight.shape)}-D quantized codes; only matrices are dequantized")
        out_f, in_f = weight.shape
        args = _weights_args(q)
        block: tuple[int, int] | None = None
        group = 0
        if info.numel != 1:
            if len(info.shape) != 2:
                raise _refuse(src, f"{name!r} {list(info.shape)} is not a tensor, channel, group or block scale")
            blocks: list[Any] = [a.get("block_structure") for a in args if a.get("block_structure")]
            if info.shape[0] == out_f and info.shape[1] > 1:
                g = in_f // info.shape[1] if in_f % info.shape[1] == 0 else 0
                sizes = {gsz for a in args if (gsz := _int(a.get("group_size"))) is not None}
                if not g or (sizes and g not in sizes):
                    raise _refuse(src, f"{name!r} {list(info.shape)} does not split {in_f} inputs into equal groups")
                group = g
            elif info.shape[0] != out_f:
                ok = len(blocks) == 1 and isinstance(blocks[0], list) and len(blocks[0]) == 2
                b = (int(blocks[0][0]), int(blocks[0][1])) if ok else (0, 0)
                if not ok or b[0] < 1 or b[1] < 1 or tuple(info.shape) != fp8.scale_shape(weight.shape, b):
                    raise _refuse(
                        src,
                        f"{name!r} {list(info.shape)} is a block scale without a block_structure in "
                        "config.json that fits it",
                    )
                block = b
        parts = [("weight", weight), ("scale", info)]
        hide = [p, name]
        zp = infos.get(p + "_zero_point")
        if zp is not None:
            if tuple(zp.shape) != tuple(info.shape) and zp.numel != info.numel:
                raise _refuse(src, f"{zp.name!r} {list(zp.shape)} does not match its scale {list(info.shape)}")
            parts.append(("zero_point", zp))
            hide.append(zp.name)
        inp = infos.get(p.rsplit(".", 1)[0] + ".input_scale")
        if inp is not None:
            hide.append(inp.name)
        fmt_name = "ct-fp8" if fp8.is_fp8(weight) else "ct-int8"
        add(p, CtFloat(fmt_name, tuple(weight.shape), tuple(parts), group=group, block=block), hide)
    # a quantized part whose weight was not found: its raw numbers would be compared as if they were parameters
    for name, info in infos.items():
        if name in found.hidden:
            continue
        tail = name.rsplit(".", 1)[-1]
        orphan = tail in _ORPHAN_TAILS or (
            info.dtype.name == "U8"
            and (name.endswith("_blocks") or name.endswith("_scales"))
            and (method == "mxfp4" or ".experts." in f".{name}")
        )
        if orphan:
            raise _refuse(
                src,
                f"tensor {name!r} is part of a quantized weight, but the rest of that weight is not "
                "in the checkpoint (or not in a layout ckptdiff reads)",
            )
    # a config naming a quantization whose tensors are absent
    if method in ("mxfp4", "compressed-tensors", "bitsandbytes", "gptq", "awq") and not found.codecs:
        fmt = q.get("format")
        if not (method == "compressed-tensors" and fmt in ("dense", "sparse-bitmask", "marlin-24")):
            where = config.where if config is not None else "config.json"
            raise _refuse(src, f"{where} says quant_method {method!r}, but no tensor is stored in that layout")
    if method == "compressed-tensors" and q.get("format") in ("sparse-bitmask", "marlin-24", "sparse-24-bitmask"):
        raise _refuse(src, f"compressed-tensors format {q.get('format')!r} is not dequantized by ckptdiff")
    return found


_ORPHAN_TAILS = frozenset({
    "weight_packed", "weight_zero_point", "weight_shape", "weight_g_idx", "qweight", "qzeros", "g_idx", "absmax",
    "quant_map", "nested_absmax", "nested_quant_map", "SCB", "weight_format",
})  # fmt: skip


def _order(src: Source) -> dict[str, int]:
    return {n: k for k, n in enumerate(src.infos)}


_UNSUPPORTED = {  # a stored name's last part -> (the layout it belongs to, a sibling part that must be there too)
    "weight_global_scale": ("NVFP4 (compressed-tensors nvfp4-pack-quantized or ModelOpt)", ""),
    "weight_scale_2": ("NVFP4 (ModelOpt)", "weight_scale"),
    "W_q": ("HQQ", ""),
    "q_weight": ("EXL2", "q_scale"),
    "codebooks": ("AQLM", "codes"),
    "trellis": ("QTIP", "SU"),
    "Qidxs": ("QuIP#", "SU"),
}


def _unsupported_names(src: Source) -> tuple[str, str]:
    """(a stored name that marks a quantized layout nothing here dequantizes, that layout), or ('', '')."""
    infos = src.infos
    for name, info in infos.items():
        stem, _, tail = name.rpartition(".")
        hit = _UNSUPPORTED.get(tail)
        if hit is not None and (not hit[1] or f"{stem}.{hit[1]}" in infos):
            return name, hit[0]
        if name.endswith(".blocks") and info.dtype.name == "U8" and name[: -len(".blocks")] + ".scales" in infos:
            return name, "gpt-oss original MXFP4 (*.blocks/*.scales; the transformers-format release is read)"
    return "", ""


# ---------------------------------------------------------------------------------------------
# the source


class QuantSource(Source):
    """A source whose quantized weights read as fp32 in their logical shape (see the module doc)."""

    def __init__(self, inner: Source, found: _Found, why: str):
        first: dict[str, str] = {}  # the first stored part of each quantized weight -> its logical name
        order = _order(inner)
        for name, codec in found.codecs.items():
            first.setdefault(min((p.name for _, p in codec.parts), key=order.__getitem__), name)
        infos: dict[str, TensorInfo] = {}
        for name, info in inner.infos.items():
            logical = first.get(name)
            if logical is not None:
                codec = found.codecs[logical]
                infos[logical] = QuantInfo(logical, F32, codec.shape, info.file, codec=codec, origin=logical)
            if name not in found.hidden and name not in found.codecs:
                infos[name] = info
        what = ", ".join(f"{n} {fmt}" for fmt, n in sorted(found.formats.items()))
        super().__init__(
            inner.spec,
            f"{inner.resolved} [quantized: {what} weights dequantized to fp32 ({why})]",
            infos,
            dict(inner.tied),
        )
        self.inner = inner
        self._lock = threading.Lock()
        self._whole: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memo: dict[str, Any] = {}  # a codec's unpacked form of the tensor read last (see remember)

    def remember(self, key: str, value: Any) -> None:
        """Keep ``value`` for ``key`` (a codec's unpacked tensor), dropping what was kept before: the chunks of one
        tensor are read in turn, so one is enough, and memory stays that of one tensor."""
        with self._lock:
            self.memo = {key: value}

    def whole(self, info: TensorInfo) -> torch.Tensor:
        """A stored tensor whole, in its stored shape; the last few kept."""
        with self._lock:
            hit = self._whole.get(info.name)
            if hit is not None:
                self._whole.move_to_end(info.name)
                return hit
        value = self.inner.read_full(info.name)
        with self._lock:
            self._whole[info.name] = value
            while len(self._whole) > _KEPT:
                self._whole.popitem(last=False)
        return value

    def codec(self, name: str) -> Codec | None:
        info = self.infos.get(name)
        return info.codec if isinstance(info, QuantInfo) else None

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        codec = self.codec(name)
        if codec is None:
            return self.inner.read(name, start, count, out)
        total = math.prod(codec.shape)
        n = total - start if count is None else count
        if n <= 0:
            return torch.empty(0, dtype=torch.float32)
        need = 4 * n
        buf = out[:need] if out is not None and out.nbytes >= need else np.empty(need, dtype=np.uint8)
        values = torch.from_numpy(buf).view(torch.float32)
        for pos, vals in self.pieces(codec, start, n):
            values[pos : pos + vals.numel()] = vals
        return values

    def pieces(self, codec: Codec, start: int, n: int, codes: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, values or codes) of logical entries [start, start + n), a bounded slab of rows at a time."""
        per = max(codec.row_len, 1)
        step = max(1, PIECE // per)
        end = start + n
        r = start // per
        while r * per < end:
            r1 = min(-(-end // per), r + step)
            got = codec.codes(self, r, r1) if codes else codec.values(self, r, r1)
            lo, hi = max(start, r * per) - r * per, min(end, r1 * per) - r * per
            yield max(start, r * per) - start, got[lo:hi]
            r = r1

    def close(self) -> None:
        with self._lock:
            self._whole.clear()
            self.memo = {}
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()

    def remote_config(self) -> tuple[str, bytes] | None:
        return self.inner.remote_config()


class StoredSource(Source):
    """``--as-stored``: every tensor as stored; the parts of quantized weights carry a note saying so."""

    def __init__(self, inner: Source, marked: Mapping[str, str], what: str):
        infos: dict[str, TensorInfo] = {}
        for name, info in inner.infos.items():
            note = marked.get(name)
            infos[name] = QuantInfo(name, info.dtype, info.shape, info.file, note=note, origin=name) if note else info
        super().__init__(inner.spec, f"{inner.resolved} [as stored: {what}]", infos, dict(inner.tied))
        self.inner = inner

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        return self.inner.read(name, start, count, out)

    def close(self) -> None:
        self.inner.close()

    def abandon_reads(self) -> None:
        self.inner.abandon_reads()

    def remote_config(self) -> tuple[str, bytes] | None:
        return self.inner.remote_config()


_PART_TAILS = frozenset({
    "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
    "input_global_scale", "qweight", "qzeros", "scales", "g_idx", "SCB", "weight_format", "absmax", "quant_map",
    "nested_absmax", "nested_quant_map", "blocks",
})  # fmt: skip


def _stored(src: Source) -> Source:
    """``src`` with every part of a quantized weight noted as compared raw (``--as-stored``)."""
    try:
        config = model_config.load(src, _PURPOSE)
    except InputError:
        config = None
    marked: dict[str, str] = {}
    try:
        found = _recognise(src, config)
        for name, codec in found.codecs.items():
            for _, part in codec.parts:
                marked[part.name] = f"as stored (--as-stored): part of {codec.fmt} weight {name}, raw storage compared"
        for name in found.hidden - set(marked):
            marked[name] = "as stored (--as-stored): quantization metadata, raw storage compared"
    except Refusal:
        pass
    infos = src.infos
    for name in infos:
        tail = name.rsplit(".", 1)[-1]
        quantized = (
            tail in _PART_TAILS
            or tail in _UNSUPPORTED
            or ".quant_state." in name
            or (name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in infos)
            or (name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in infos)
            or (tail == "weight" and (name + ".absmax" in infos or name[: -len("weight")] + "SCB" in infos))
        )
        if quantized:
            marked.setdefault(name, "as stored (--as-stored): quantized storage compared raw")
    for name, info in src.infos.items():
        if name.endswith(fp8.SCALE_SUFFIX) or (fp8.is_fp8(info) and name not in marked):
            marked.setdefault(name, "as stored (--as-stored): fp8 storage compared without its scale")
    if not marked:
        return src
    return StoredSource(src, marked, f"{len(marked)} quantized tensors compared as raw storage, on purpose")


def wrap(src: Source) -> Source:
    """``src`` with its quantized weights read as fp32 values (a :class:`QuantSource`), or ``src`` itself when none
    is recognised; :class:`Refusal` (exit 2, hint ``--as-stored``) for a layout not dequantized or a contradiction.
    Under :func:`as_stored`, ``src`` with its quantized parts noted instead."""
    if isinstance(src, (QuantSource, StoredSource)):
        return src
    if stored_wanted():
        return _stored(src)
    odd, layout = _unsupported_names(src)
    if odd:
        raise _refuse(src, f"tensor {odd!r} belongs to the {layout} layout, which ckptdiff does not dequantize")
    names = src.infos
    suspect = any(
        n.endswith(("_blocks", "_scales", ".weight_scale", ".blocks"))
        or n.rsplit(".", 1)[-1] in _ORPHAN_TAILS
        or ".quant_state." in n
        for n in names
    )
    config = model_config.load(src, _PURPOSE) if suspect else _config_if_any(src)
    if not suspect and not _quant_config(config):
        return src
    found = _recognise(src, config)
    if not found.codecs:
        return src
    q = _quant_config(config)
    why = f"config.json quant_method {q['quant_method']}" if q.get("quant_method") else "recognised from the tensors"
    return QuantSource(src, found, why)


def _config_if_any(src: Source) -> ModelConfig | None:
    """The local config of a checkpoint with no quantized-looking tensor (to catch a config that says it is
    quantized); None when it is absent, unreadable (nothing here needs it then) or remote (not fetched for this)."""
    d = model_config.folder(src)
    if d is None or not (d / model_config.NAME).is_file():
        return None
    try:
        return model_config.load(src, _PURPOSE)
    except InputError:
        return None


def find(src: Source) -> QuantSource | None:
    """The :class:`QuantSource` inside ``src`` (itself or a wrapper's ``inner``), if any."""
    seen = 0
    while seen < 8:
        if isinstance(src, QuantSource):
            return src
        inner = getattr(src, "inner", None)
        if not isinstance(inner, Source):
            return None
        src, seen = inner, seen + 1
    return None


# ---------------------------------------------------------------------------------------------
# codes and scales changed, for the sparsity CSV


def _slice(info: QuantInfo) -> tuple[int, int]:
    """(first logical row, rows) of a tensor in its quantized weight: an expert slice is one row of the stack."""
    assert info.codec is not None
    if info.name != info.origin and info.name.endswith("]") and "[" in info.name:
        e = int(info.name[info.name.rindex("[") + 1 : -1])
        return e, 1
    return 0, info.codec.shape[0]


class Stats:
    """``codes_changed`` and ``scale_blocks_changed`` of one base/fine-tune pair, for quantized weights (here)
    and block-scaled FP8 weights (:class:`ckptdiff.io.views.fp8.CodeStats`), into one pair of dicts."""

    def __init__(self, base: Source, ft: Source):
        self.fp8 = fp8.CodeStats.for_pair(base, ft)
        self.qa, self.qb = find(base), find(ft)
        self.codes: dict[str, int] = {}
        self.blocks: dict[str, int] = {}
        if self.fp8 is not None:
            self.fp8.codes, self.fp8.blocks = self.codes, self.blocks

    @classmethod
    def for_pair(cls, base: Source, ft: Source) -> Stats | None:
        """Stats for a pair, or None when neither kind of scaled weight is on both sides."""
        made = cls(base, ft)
        if made.fp8 is None and (made.qa is None or made.qb is None):
            return None
        return made

    def _pair(self, item: fp8.Paired) -> tuple[QuantInfo, QuantInfo] | None:
        a, b = item.infos[0], item.infos[-1]
        if not (isinstance(a, QuantInfo) and isinstance(b, QuantInfo) and a.codec and b.codec):
            return None
        if self.qa is None or self.qb is None or type(a.codec) is not type(b.codec) or a.codec.shape != b.codec.shape:
            return None
        return a, b

    def add(self, item: fp8.Paired, start: int, count: int) -> None:
        """Count the changes of ``item`` once, with its first chunk."""
        pair = self._pair(item)
        if pair is None:
            if self.fp8 is not None:
                self.fp8.add(item, start, count)
            return
        if start != 0:
            return
        a, b = pair
        assert a.codec is not None and b.codec is not None and self.qa is not None and self.qb is not None
        r0, rows = _slice(a)
        per = max(a.codec.row_len, 1)
        changed = 0
        for (_, c0), (_, c1) in zip(
            self.qa.pieces(a.codec, r0 * per, rows * per, codes=True),
            self.qb.pieces(b.codec, r0 * per, rows * per, codes=True),
            strict=True,
        ):
            changed += int((c0 != c1).sum())
        self.codes[item.name] = changed
        g0, g1 = a.codec.groups(self.qa, r0, r0 + rows), b.codec.groups(self.qb, r0, r0 + rows)
        if g0.shape == g1.shape:
            self.blocks[item.name] = int((g0 != g1).any(dim=1).sum())

    def columns(self, item: fp8.Paired) -> dict[str, float]:
        nan = float("nan")
        if self._pair(item) is None:
            return self.fp8.columns(item) if self.fp8 is not None else dict.fromkeys(fp8.FP8_COLUMNS, nan)
        if not item.comparable:
            return dict.fromkeys(fp8.FP8_COLUMNS, nan)
        return {
            "codes_changed": self.codes.get(item.name, 0),
            "scale_blocks_changed": self.blocks.get(item.name, nan),
        }

    def close(self) -> None:
        if self.fp8 is not None:
            self.fp8.close()
