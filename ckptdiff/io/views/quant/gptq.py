"""GPTQ and AWQ (GEMM): their codec and how their weights are found.

- ``gptq``: ``qweight`` I32 ``(in·bits/32, out)`` packed along the input (row i in word i·bits/32, bits
  ``bits·(i mod 32/bits)`` up), ``qzeros`` ``(G, out·bits/32)`` packed along the output, ``scales`` ``(G, out)``,
  ``g_idx`` the group of each input (act-order); ``W[o, i] = s[g(i), o] · (q[i, o] − z[g(i), o])`` where, for the
  ``gptq`` checkpoint format, each qzeros word is the true zeros' word minus a 1 in every field as one 32-bit
  subtraction (GPTQModel's v2 -> v1; a true zero of 0 borrows from the next field), read back by adding it again
  as GPTQModel does; ``gptq_v2`` stores the zeros as they are.
- ``awq`` (GEMM): ``qweight`` ``(in, out/8)`` with the interleaved order (column 8k + j in nibble
  ``[0, 4, 1, 5, 2, 6, 3, 7][j]``), ``qzeros`` alike, ``scales`` ``(G, out)``: ``W[o, i] = s[i // gs, o] ·
  (q[i, o] − z[i // gs, o])``.

The packing order and bits are not in the tensors: config.json's quant_method (``gptq`` or ``awq``) is required.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptdiff.io.source import TensorInfo
from ckptdiff.io.views.quant.base import (
    Codec,
    Format,
    Reader,
    Recognition,
    as_int,
    f64,
    fdt,
    groups_of,
    unpack_rows,
)

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
        codes = unpack_rows(words, self.bits, words.shape[1] * (32 // self.bits))
        if self.awq:
            order = torch.tensor(AWQ_ORDER)
            cols = torch.arange(codes.shape[1]).reshape(-1, 8)
            codes = codes[:, (cols[:, :1] + order).reshape(-1)]
        return codes[:, :width]

    def _qweight(self, src: Reader) -> torch.Tensor:
        """(in, out) unsigned codes."""
        out_f, in_f = self.shape
        words = src.whole(self.need("qweight"))
        if self.awq:
            return self._unpack_out(words, out_f)
        per = 32 // self.bits
        shifts = torch.arange(per, dtype=torch.int32) * self.bits
        codes = (words.to(torch.int32).unsqueeze(1) >> shifts.reshape(1, per, 1)) & ((1 << self.bits) - 1)
        return codes.to(torch.uint8).reshape(-1, out_f)[:in_f]

    def _g(self, src: Reader) -> torch.Tensor:
        in_f = self.shape[1]
        g_idx = self.part("g_idx")
        if g_idx is not None and not self.awq:
            return groups_of(src, g_idx, self.need("scales").shape[0])
        if not self.group:
            return torch.zeros(in_f, dtype=torch.int64)
        return torch.arange(in_f) // self.group

    def _sz(self, src: Reader) -> tuple[torch.Tensor, torch.Tensor]:
        out_f = self.shape[0]
        s = f64(src.whole(self.need("scales")))
        words = src.whole(self.need("qzeros"))
        if self.plus_one:
            # v1 words are the v2 words minus one in every field, as one 32-bit subtraction (GPTQModel's
            # v2 -> v1): add it back the same way, so a field stored as all ones borrows from the next one
            ones = sum(1 << k for k in range(0, 32, self.bits))
            wide = (words.to(torch.int64) + ones) & 0xFFFFFFFF
            words = torch.where(wide >= 1 << 31, wide - (1 << 32), wide).to(torch.int32)
        return s, self._unpack_out(words, out_f).to(torch.float64)

    def _unpacked(self, src: Reader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (in, out) uint8, scales, zeros (G, out) float64, group of each input), unpacked once per read
        of the tensor's chunks."""
        key = self.need("qweight").name
        hit = src.memo.get(key)
        if hit is None:
            s, z = self._sz(src)
            hit = (self._qweight(src).to(torch.uint8), s, z, self._g(src))
            src.remember(key, hit)
        return hit

    def values(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        q_all, s, z, g = self._unpacked(src)
        q = q_all[:, r0:r1]  # (in, rows)
        dt = fdt(self.need("scales"))
        zs, ss = z[:, r0:r1].to(dt), s[:, r0:r1].to(dt)
        values = ((q.to(dt) - zs[g]) * ss[g]).to(torch.float32)  # q − z: small integers, exact
        return values.t().reshape(-1)

    def codes(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        return self._unpacked(src)[0][:, r0:r1].t().reshape(-1)

    def groups(self, src: Reader, r0: int, r1: int) -> torch.Tensor:
        _, s, z, _ = self._unpacked(src)
        return torch.stack((s[:, r0:r1].reshape(-1), z[:, r0:r1].reshape(-1)), dim=1)


class GptqFormat(Format):
    """``S.qweight`` + ``S.qzeros`` + ``S.scales`` [+ ``S.g_idx``], read as config.json's quant_method says."""

    methods = frozenset({"gptq", "awq"})
    promised = frozenset({"gptq", "awq"})
    part_tails = frozenset({"qweight", "qzeros", "g_idx"})
    stored_tails = frozenset({"qweight", "qzeros", "scales", "g_idx"})

    def anchors(self, ctx: Recognition, name: str, info: TensorInfo) -> bool:
        return name.endswith(".qweight")

    def recognise(self, ctx: Recognition, name: str, info: TensorInfo) -> None:
        infos, q, method = ctx.infos, ctx.q, ctx.method
        stem = name[: -len(".qweight")]
        qz, sc = infos.get(stem + ".qzeros"), infos.get(stem + ".scales")
        if method not in ("gptq", "awq"):
            raise ctx.refuse(
                f"{name!r} is GPTQ/AWQ packing, but config.json's quant_method is "
                f"{method!r}: the packing order and bits are unknown",
            )
        if info.dtype.name != "I32" or qz is None or qz.dtype.name != "I32" or sc is None or len(sc.shape) != 2:
            raise ctx.refuse(f"{name!r}: packed codes without int32 qzeros and 2-D scales")
        if len(info.shape) != 2 or len(qz.shape) != 2:
            raise ctx.refuse(f"{name!r} {list(info.shape)} and its qzeros {list(qz.shape)} are not 2-D packed words")
        raw_bits = q.get("bits", q.get("w_bit", 4))
        bits = as_int(raw_bits)
        awq = method == "awq"
        if (
            bits is None
            or bits not in ((4,) if awq else (2, 4, 8))
            or (awq and str(q.get("version", "gemm")).lower() != "gemm")
        ):
            raise ctx.refuse(
                f"{name!r}: {method} with {raw_bits!r} bits, version {q.get('version', '-')}: only "
                "2/4/8-bit GPTQ and 4-bit AWQ GEMM are dequantized",
            )
        raw_fmt = q.get("checkpoint_format") or "gptq"  # zeros stored minus one (gptq) or as they are (gptq_v2)
        fmt_ck = str(raw_fmt).lower()
        if not awq and fmt_ck not in ("gptq", "gptq_v2"):
            raise ctx.refuse(
                f"{name!r}: config.json's checkpoint_format is {raw_fmt!r}, a packing ckptdiff does not read: only "
                "'gptq' and 'gptq_v2' GPTQ checkpoints are dequantized",
            )
        per = 32 // bits
        if awq:
            in_f, out_f = info.shape[0], info.shape[1] * per
        else:
            in_f, out_f = info.shape[0] * per, info.shape[1]
        gi = infos.get(stem + ".g_idx")
        if gi is not None and not awq:
            if gi.dtype.is_float or -(-gi.numel // per) != info.shape[0]:  # the last word may hold padding
                raise ctx.refuse(
                    f"{gi.name!r} {gi.dtype.short} {list(gi.shape)} is not one group index per input of the "
                    f"{in_f} inputs {name!r} {list(info.shape)} packs",
                )
            in_f = gi.numel
        gs = as_int(q.get("group_size", q.get("q_group_size")))
        group = 0 if gs is None or gs <= 0 else gs
        n_groups = -(-in_f // group) if group else 1
        ok = sc.shape[1] == out_f and qz.shape[1] * per == out_f and qz.shape[0] == sc.shape[0]
        ok = ok and ((gi is not None and not awq) or sc.shape[0] == n_groups)
        if not ok:
            raise ctx.refuse(
                f"{name!r} {list(info.shape)}, qzeros {list(qz.shape)}, scales {list(sc.shape)} "
                f"do not fit {bits}-bit {method} with group_size {gs}: the config contradicts them",
            )
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
        ctx.add(stem + ".weight", codec, hide)


FORMAT = GptqFormat()
