"""MXFP4 (gpt-oss experts; transformers' mxfp4 integration): its codec and how its weights are found.

``P_blocks`` U8 ``(E, R, G, 16)``, two FP4 E2M1 codes per byte, the low nibble first, and ``P_scales`` U8
``(E, R, G)``, an E8M0 exponent per 32 codes. ``P[e]`` is the transpose of the ``(R, 32·G)`` matrix
``fp4(code) · 2^(scale − 127)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ckptdiff.io.source import TensorInfo
from ckptdiff.io.views.quant.base import Codec, Format, Reader, Recognition, f64, rows_of, split_nibbles

FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4 = torch.tensor(FP4_E2M1, dtype=torch.float32)


def e8m0(exps: torch.Tensor) -> torch.Tensor:
    """fp32 2^(e − 127) of E8M0 exponents, built from its bits (exact: 2^−127 is an fp32 subnormal); 255, whose
    2^128 fp32 lacks, gives 2^127: :meth:`Mxfp4.values` doubles those products once more."""
    e = exps.to(torch.int32)
    bits = torch.where(e == 0, 1 << 22, torch.where(e == 255, 254 << 23, e << 23))
    return bits.view(torch.float32)


@dataclass(frozen=True)
class Mxfp4(Codec):
    """gpt-oss MXFP4 experts: logical (E, 32·G, R), the transpose of each expert's (R, 32·G) dequantized blocks."""

    @property
    def label(self) -> str:
        return "mxfp4/32"

    def _nibbles(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        """(n, R, G, 32) uint8 codes, the low nibble of each byte first."""
        blocks = rows_of(src, self.need("blocks"), r0, r1)  # (n, R, G, 16) uint8
        return split_nibbles(blocks, low_first=True).reshape(*blocks.shape[:-1], 32)

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0, r1)
        n, rr, g, _ = nib.shape
        # each product of a code value and a power of two rounds once in fp32: the exact value, rounded once
        scales = rows_of(src, self.need("scales"), r0, r1)
        values = _FP4[nib.to(torch.int32)] * e8m0(scales).unsqueeze(-1)
        top = scales == 255
        if bool(top.any()):
            # 2^128, as transformers' ldexp gives it (not the OCP definition's NaN): code · 2^127, exact or already
            # ±inf, doubled once: ±0 stays ±0, ±0.5 is ±2^127, every larger code ±inf
            values = torch.where(top.unsqueeze(-1), values * 2, values)
        return values.reshape(n, rr, g * 32).transpose(1, 2).reshape(-1)

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        nib = self._nibbles(src, r0, r1)
        n, rr, g, _ = nib.shape
        nib = torch.where(nib == 8, 0, nib)  # −0 is +0
        return nib.reshape(n, rr, g * 32).transpose(1, 2).reshape(-1)

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        return f64(rows_of(src, self.need("scales"), r0, r1)).reshape(-1, 1)


def _pair(name: str, suffix: str, other: str, infos: Mapping[str, TensorInfo]) -> bool:
    """Whether ``name`` ends in ``suffix`` with the sibling ending in ``other`` stored beside it."""
    return name.endswith(suffix) and name[: -len(suffix)] + other in infos


class Mxfp4Format(Format):
    """``P_blocks`` + ``P_scales`` of an expert stack."""

    methods = frozenset({"mxfp4"})
    promised = frozenset({"mxfp4"})

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return name.endswith("_blocks") and info.dtype.name == "U8" and _pair(name, "_blocks", "_scales", ctx.infos)

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        base = name[: -len("_blocks")]
        scales = ctx.infos[base + "_scales"]
        ctx.expect({"mxfp4"}, "MXFP4 blocks and scales", name)
        shape = info.shape
        if len(shape) != 4 or shape[-1] != 16 or scales.dtype.name != "U8" or tuple(scales.shape) != shape[:-1]:
            raise ctx.refuse(
                f"MXFP4 tensor {name!r} {list(shape)} with scales {list(scales.shape)} is not "
                "the (experts, rows, groups, 16) layout ckptdiff dequantizes",
            )
        if ".experts." not in f".{base}":
            raise ctx.refuse(
                f"MXFP4 tensor {name!r} is not an expert stack (transformers dequantizes only "
                "the experts' gate_up_proj/down_proj)",
            )
        logical = (shape[0], shape[2] * 32, shape[1])
        ctx.add(base, Mxfp4("mxfp4", logical, (("blocks", info), ("scales", scales))), (name, base + "_scales"))

    def suspect(self, name: str) -> bool:
        return name.endswith(("_blocks", "_scales"))

    def orphan(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return (
            info.dtype.name == "U8"
            and (name.endswith("_blocks") or name.endswith("_scales"))
            and (ctx.method == "mxfp4" or ".experts." in f".{name}")
        )

    def stored_part(self, name: str, infos: Mapping[str, TensorInfo]) -> bool:
        return _pair(name, "_blocks", "_scales", infos) or _pair(name, "_scales", "_blocks", infos)


FORMAT = Mxfp4Format()
