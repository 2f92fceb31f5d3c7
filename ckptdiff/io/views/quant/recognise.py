"""THE table of quantized formats, tried in order, and the rules that hold for every format: an unknown
quant_method, a part left without its weight, a layout recognised but not dequantized.

A new format is one module (its codec and its :class:`~ckptdiff.io.views.quant.base.Format`) and one row of
:data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ckptdiff.io.source import Source, TensorInfo
from ckptdiff.io.views.config import ModelConfig
from ckptdiff.io.views.quant import bnb, compressed, gptq, mxfp4
from ckptdiff.io.views.quant.base import Format, Found, Recognition, tail

#: every format, in the order each stored tensor is offered to them: the first whose anchor it is recognises the
#: weight; ``late`` formats run after, over the tensors no weight hid.
FORMATS: tuple[Format, ...] = (
    mxfp4.FORMAT,  # P_blocks + P_scales
    compressed.PACKED,  # P.weight_packed + weight_shape + weight_scale
    bnb.FOUR_BIT,  # P.weight.quant_state.bitsandbytes__nf4|fp4
    bnb.INT8,  # S.SCB
    gptq.FORMAT,  # S.qweight (GPTQ or AWQ as config.json says)
    compressed.SCALED,  # P.weight F8/I8 + P.weight_scale (late)
)

KNOWN_METHODS = frozenset().union(*(f.methods for f in FORMATS))

UNSUPPORTED = {  # a stored name's last part -> (the layout it belongs to, a sibling part that must be there too)
    "weight_global_scale": ("NVFP4 (compressed-tensors nvfp4-pack-quantized or ModelOpt)", ""),
    "weight_scale_2": ("NVFP4 (ModelOpt)", "weight_scale"),
    "W_q": ("HQQ", ""),
    "q_weight": ("EXL2", "q_scale"),
    "codebooks": ("AQLM", "codes"),
    "trellis": ("QTIP", "SU"),
    "Qidxs": ("QuIP#", "SU"),
}
_ORIGINAL_MXFP4 = "gpt-oss original MXFP4 (*.blocks/*.scales; the transformers-format release is read)"


def unsupported_names(src: Source) -> tuple[str, str]:
    """(a stored name that marks a quantized layout nothing here dequantizes, that layout), or ('', '')."""
    infos = src.infos
    for name, info in infos.items():
        stem, _, last = name.rpartition(".")
        hit = UNSUPPORTED.get(last)
        if hit is not None and (not hit[1] or f"{stem}.{hit[1]}" in infos):
            return name, hit[0]
        if name.endswith(".blocks") and info.dtype.name == "U8" and name[: -len(".blocks")] + ".scales" in infos:
            return name, _ORIGINAL_MXFP4
    return "", ""


def suspect(name: str) -> bool:
    """Whether a stored name looks like a part of a quantized weight (config.json is then read)."""
    return name.endswith(".blocks") or any(f.suspect(name) for f in FORMATS)


def stored_part(name: str, infos: Mapping[str, TensorInfo]) -> bool:
    """Whether a stored tensor is quantized storage, noted as compared raw under ``--as-stored``."""
    last = tail(name)
    return last in UNSUPPORTED or last == "blocks" or any(f.stored_part(name, infos) for f in FORMATS)


def recognise(src: Source, config: ModelConfig | None) -> Found:
    """Every quantized weight of ``src``, its parts and the tensors it hides; a
    :class:`~ckptdiff.io.views.quant.base.Refusal` for a layout not dequantized or a contradiction."""
    ctx = Recognition(src, config)
    if ctx.method is not None and not isinstance(ctx.method, str):
        raise ctx.refuse(
            f"{ctx.where} says quant_method {ctx.method!r}: quant_method must be a name such as 'gptq'; fix the config"
        )
    if ctx.method is not None and ctx.method not in KNOWN_METHODS:
        raise ctx.refuse(f"{ctx.where} says quant_method {ctx.method!r}, a quantization ckptdiff does not dequantize")
    for late in (False, True):
        formats = [f for f in FORMATS if f.late == late]
        for name, info in ctx.infos.items():
            if late and name in ctx.found.hidden:
                continue
            for f in formats:
                if f.anchors(ctx, name, info):
                    f.recognise(ctx, name, info)
                    break
    # a quantized part whose weight was not found: its raw numbers would be compared as if they were parameters
    for name, info in ctx.infos.items():
        if name not in ctx.found.hidden and any(f.orphan(ctx, name, info) for f in FORMATS):
            raise ctx.refuse(
                f"tensor {name!r} is part of a quantized weight, but the rest of that weight is not "
                "in the checkpoint (or not in a layout ckptdiff reads)",
            )
    for f in FORMATS:  # a config naming a quantization whose tensors are absent, or a variant not dequantized
        f.finish(ctx)
    return ctx.found
