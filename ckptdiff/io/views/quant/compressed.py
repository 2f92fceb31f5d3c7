"""compressed-tensors (and ModelOpt, fbgemm FP8): its codecs and how its weights are found.

- ``ct-int`` (``pack-quantized``, W4A16/W8A16): ``weight_packed`` I32 ``(out, ⌈in/p⌉)`` with p = 32/bits codes
  per word, the first column in the lowest bits, each code stored as ``q + 2^(bits−1)``; ``weight_scale`` per
  tensor, channel ``(out, 1)`` or group ``(out, G)``; ``weight_zero_point`` (asymmetric) packed the same way along
  the rows; ``weight_shape`` the logical shape; ``weight_g_idx`` act-order groups. ``W = (q − z) · s``.
- ``ct-float`` / ``ct-int8`` (``float-quantized``/``naive-quantized``, also ModelOpt and fbgemm FP8): ``weight``
  F8_E4M3 or I8 beside ``weight_scale`` (per tensor, channel, group, or block with ``block_structure``) and
  optional ``weight_zero_point``; ``W = (q − z) · s``; ``input_scale`` is an activation scale, hidden.

Two formats: :data:`PACKED` (found from ``weight_packed``) and :data:`SCALED` (found from ``weight_scale``, tried
after every other format, on the tensors they left).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptdiff.io.source import TensorInfo
from ckptdiff.io.views import fp8
from ckptdiff.io.views.quant.base import (
    Codec,
    Format,
    Reader,
    Recognition,
    as_int,
    f64,
    fdt,
    groups_of,
    rows_of,
    scale_rows,
    small_ints,
    unpack_rows,
)

_INT_FMTS = {"pack-quantized", "naive-quantized", "int-quantized", "float-quantized", "mixed-precision"}


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

    def _cols_group(self, src: Reader, n_groups: int) -> torch.Tensor:
        cols = self.shape[1]
        g_idx = self.part("g_idx")
        if g_idx is not None:
            return groups_of(src, g_idx, n_groups)
        if n_groups <= 1:
            return torch.zeros(cols, dtype=torch.int64)
        return torch.arange(cols, dtype=torch.int64) // self.group

    def _codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        words = rows_of(src, self.need("packed"), r0, r1)
        return unpack_rows(words, self.bits, self.shape[1]).to(torch.int16) - (1 << (self.bits - 1))

    def _zeros(self, src: Reader, r0: int, r1: int, n_groups: int) -> torch.Tensor | None:
        plain = self.part("zero_point_plain")  # one signed integer per scale (older compressed-tensors)
        if plain is not None:
            return rows_of(src, plain, r0, r1).to(torch.float64).reshape(r1 - r0, -1)
        zp = self.part("zero_point")
        if zp is None:
            return None
        per = 32 // self.bits
        words = rows_of(src, zp, r0 // per, -(-r1 // per))  # (⌈⌉, G): rows packed along dim 0
        w = words.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per, dtype=torch.int64) * self.bits
        z = (w.unsqueeze(1) >> shifts.reshape(1, per, 1)) & ((1 << self.bits) - 1)  # (⌈⌉, per, G)
        z = z.reshape(-1, z.shape[-1]) - (1 << (self.bits - 1))
        first = (r0 // per) * per
        return z[r0 - first : r1 - first].to(torch.float64)

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        q = self._codes(src, r0, r1)
        s = scale_rows(src, self.need("scale"), r0, r1, self.shape[0])
        col_g = self._cols_group(src, s.shape[1])
        z = self._zeros(src, r0, r1, s.shape[1])
        dt = fdt(self.need("scale"))
        qf = q.to(dt)
        if z is not None:
            qf = qf - z.to(dt)[:, col_g]  # small integers: exact
        return (qf * s.to(dt)[:, col_g]).to(torch.float32).reshape(-1)

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        return self._codes(src, r0, r1).reshape(-1)

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        s = scale_rows(src, self.need("scale"), r0, r1, self.shape[0])
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

    def _scales(self, src: Reader, role: str, r0: int, r1: int) -> torch.Tensor:
        """(r1 − r0, n) float64 scale (or zero point) of every entry of rows [r0, r1)."""
        info = self.need(role)
        cols = self.shape[1]
        if info.numel == 1:
            return f64(src.inner.read(info.name)).reshape(1, 1).expand(r1 - r0, cols)
        if self.block is not None:
            b0, b1 = self.block
            s = f64(rows_of(src, info, r0 // b0, (r1 - 1) // b0 + 1))
            rows = torch.arange(r0, r1) // b0 - r0 // b0
            return s[rows][:, torch.arange(cols) // b1]
        s = f64(rows_of(src, info, r0, r1)).reshape(r1 - r0, -1)
        if s.shape[1] == 1:
            return s.expand(r1 - r0, cols)
        return s[:, torch.arange(cols) // self.group]

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        raw = rows_of(src, self.need("weight"), r0, r1)
        zp = self.part("zero_point")
        dt = torch.float64 if zp is not None else fdt(self.need("scale"))  # q − z is exact in float64
        qf = raw.to(dt)
        if zp is not None:
            qf = qf - self._scales(src, "zero_point", r0, r1)
        return (qf * self._scales(src, "scale", r0, r1).to(dt)).to(torch.float32).reshape(-1)

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        raw = rows_of(src, self.need("weight"), r0, r1)
        if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            bits = raw.view(torch.uint8)
            return torch.where((bits & 0x7F) == 0, 0, bits).reshape(-1)  # −0 is +0
        return raw.reshape(-1)

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        scale = self.need("scale")
        if scale.numel == 1:
            s = f64(src.inner.read(scale.name)).reshape(1, 1)
        elif self.block is not None:
            s = f64(rows_of(src, scale, r0 // self.block[0], (r1 - 1) // self.block[0] + 1)).reshape(-1, 1)
        else:
            s = f64(rows_of(src, scale, r0, r1)).reshape(-1, 1)
        zp = self.part("zero_point")
        if zp is None:
            return s
        if zp.numel == 1:
            z = f64(src.inner.read(zp.name)).reshape(1, 1)
        elif self.block is not None:
            z = f64(rows_of(src, zp, r0 // self.block[0], (r1 - 1) // self.block[0] + 1)).reshape(-1, 1)
        else:
            z = f64(rows_of(src, zp, r0, r1)).reshape(-1, 1)
        return torch.cat((s, z), dim=1)


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


class PackedFormat(Format):
    """``P.weight_packed`` + ``P.weight_shape`` + ``P.weight_scale`` [+ ``P.weight_zero_point``, ``P.weight_g_idx``]."""

    methods = frozenset({"compressed-tensors"})
    promised = frozenset({"compressed-tensors"})
    part_tails = frozenset({"weight_packed", "weight_zero_point", "weight_shape", "weight_g_idx"})
    stored_tails = frozenset({
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_global_scale",
    })  # fmt: skip

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return name.endswith(".weight_packed")

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        infos, q = ctx.infos, ctx.q
        p = name[: -len("_packed")]  # P.weight
        stem = name[: -len(".weight_packed")]
        ctx.expect({"compressed-tensors"}, "compressed-tensors packed codes", name)
        fmt = q.get("format") if q else None
        if info.dtype.name != "I32" or stem + ".weight_global_scale" in infos or fmt not in (None, *_INT_FMTS):
            raise ctx.refuse(
                f"{name!r} is {info.dtype.short} packed codes of compressed-tensors format "
                f"{fmt or 'nvfp4-pack-quantized'}, which ckptdiff does not dequantize",
            )
        shape_t = infos.get(p + "_shape")
        scale = infos.get(p + "_scale")
        if shape_t is None or scale is None or len(info.shape) != 2:
            raise ctx.refuse(f"{name!r} lacks its weight_shape or weight_scale (or is not 2-D)")
        dims = small_ints(ctx.src, shape_t)
        if len(dims) != 2:
            raise ctx.refuse(f"{shape_t.name!r} holds {dims}, not a 2-D shape")
        out_f, in_f = dims
        args = _weights_args(q)
        bits_cfg = {nb for a in args if (nb := as_int(a.get("num_bits"))) is not None}
        fits = [b for b in (4, 8, 2) if -(-in_f // (32 // b)) == info.shape[1]]
        bits_ok = [b for b in fits if not bits_cfg or b in bits_cfg]
        if len(bits_ok) != 1 or info.shape[0] != out_f:
            raise ctx.refuse(
                f"{name!r} {list(info.shape)} does not fit weight_shape {dims} with num_bits "
                f"{sorted(bits_cfg) or 'of 2, 4 or 8'}",
            )
        bits = bits_ok[0]
        g_cols = scale.shape[1] if len(scale.shape) == 2 else 1
        if scale.numel not in (1, out_f * g_cols) or (scale.numel != 1 and scale.shape[0] != out_f):
            raise ctx.refuse(
                f"{scale.name!r} {list(scale.shape)} is not a tensor, channel or group scale of "
                f"the {out_f}x{in_f} weight",
            )
        sizes = {gsz for a in args if (gsz := as_int(a.get("group_size"))) is not None}
        group = 0
        if g_cols > 1:
            cands = [g for g in sizes if g and -(-in_f // g) == g_cols] or (
                [] if sizes else [-(-in_f // g_cols)] if -(-in_f // -(-in_f // g_cols)) == g_cols else []
            )
            if len(cands) != 1:
                raise ctx.refuse(
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
                raise ctx.refuse(
                    f"{zp.name!r} {zp.dtype.short} {list(zp.shape)} is neither the packed zero point "
                    "compressed-tensors writes nor one integer per scale",
                )
            parts.append(("zero_point" if packed_zp else "zero_point_plain", zp))
            hide.append(zp.name)
        gi = infos.get(p + "_g_idx")
        if gi is not None:
            if gi.numel != in_f or gi.dtype.is_float:
                raise ctx.refuse(f"{gi.name!r} is not one group index per input")
            parts.append(("g_idx", gi))
            hide.append(gi.name)
        ctx.add(p, CtInt("ct-int", (out_f, in_f), tuple(parts), bits=bits, group=group), hide)

    def finish(self, ctx: Recognition) -> None:
        if ctx.method != "compressed-tensors":
            return
        fmt = ctx.q.get("format")
        if not ctx.found.codecs and fmt not in ("dense", "sparse-bitmask", "marlin-24"):
            raise ctx.absent()
        if fmt in ("sparse-bitmask", "marlin-24", "sparse-24-bitmask"):
            raise ctx.refuse(f"compressed-tensors format {fmt!r} is not dequantized by ckptdiff")


class ScaledFormat(Format):
    """Unpacked codes with a weight_scale (compressed-tensors float/int, ModelOpt, fbgemm): ``P.weight`` F8_E4M3 or
    I8 + ``P.weight_scale`` [+ ``P.weight_zero_point``; ``input_scale`` hidden]."""

    methods = frozenset({"compressed-tensors", "modelopt", "fbgemm_fp8", "fp8"})
    part_tails = frozenset({"weight_zero_point"})
    stored_tails = frozenset({"weight_scale", "weight_zero_point", "input_scale"})
    late = True  # a weight_scale may be a part of a layout found first (compressed-tensors packed)

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        if not name.endswith(".weight_scale"):
            return False
        p = name[: -len("_scale")]
        weight = ctx.infos.get(p)
        if weight is None or p in ctx.found.codecs:
            return False
        return fp8.is_fp8(weight) or weight.dtype.name == "I8"

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        infos = ctx.infos
        p = name[: -len("_scale")]
        weight = infos[p]
        scaled_methods = {"compressed-tensors", "modelopt", "fbgemm_fp8", "fp8"}
        ctx.expect(scaled_methods, f"{weight.dtype.short} codes with a weight_scale", p)
        if len(weight.shape) != 2:
            raise ctx.refuse(f"{p!r} is {len(weight.shape)}-D quantized codes; only matrices are dequantized")
        out_f, in_f = weight.shape
        args = _weights_args(ctx.q)
        block: tuple[int, int] | None = None
        group = 0
        if info.numel != 1:
            if len(info.shape) != 2:
                raise ctx.refuse(f"{name!r} {list(info.shape)} is not a tensor, channel, group or block scale")
            blocks: list[Any] = [a.get("block_structure") for a in args if a.get("block_structure")]
            if info.shape[0] == out_f and info.shape[1] > 1:
                g = in_f // info.shape[1] if in_f % info.shape[1] == 0 else 0
                sizes = {gsz for a in args if (gsz := as_int(a.get("group_size"))) is not None}
                if not g or (sizes and g not in sizes):
                    raise ctx.refuse(f"{name!r} {list(info.shape)} does not split {in_f} inputs into equal groups")
                group = g
            elif info.shape[0] != out_f:
                ok = len(blocks) == 1 and isinstance(blocks[0], list) and len(blocks[0]) == 2
                b = (int(blocks[0][0]), int(blocks[0][1])) if ok else (0, 0)
                if not ok or b[0] < 1 or b[1] < 1 or tuple(info.shape) != fp8.scale_shape(weight.shape, b):
                    raise ctx.refuse(
                        f"{name!r} {list(info.shape)} is a block scale without a block_structure in "
                        "config.json that fits it",
                    )
                block = b
        parts = [("weight", weight), ("scale", info)]
        hide = [p, name]
        zp = infos.get(p + "_zero_point")
        if zp is not None:
            # entry by entry with its scale (read with the scale's layout): the same shape, or one value each
            if tuple(zp.shape) != tuple(info.shape) and not zp.numel == info.numel == 1:
                raise ctx.refuse(f"{zp.name!r} {list(zp.shape)} does not match its scale {list(info.shape)}")
            parts.append(("zero_point", zp))
            hide.append(zp.name)
        inp = infos.get(p.rsplit(".", 1)[0] + ".input_scale")
        if inp is not None:
            hide.append(inp.name)
        fmt_name = "ct-fp8" if fp8.is_fp8(weight) else "ct-int8"
        ctx.add(p, CtFloat(fmt_name, tuple(weight.shape), tuple(parts), group=group, block=block), hide)

    def suspect(self, name: str) -> bool:
        return name.endswith(".weight_scale") or super().suspect(name)


PACKED = PackedFormat()
SCALED = ScaledFormat()
