"""Quantized checkpoints read as values: MXFP4, compressed-tensors, bitsandbytes, GPTQ and AWQ weights dequantized.

Each quantized weight is stored as several tensors (packed codes, scales, zero points, a quant map, a state) under
names of its own. :func:`wrap` recognises every such layout from tensor names, dtypes and ``config.json``'s
``quantization_config``, and presents each quantized weight as one fp32 tensor (:class:`QuantInfo`) in its logical
shape, under the name the unquantized checkpoint gives it (``mlp.experts.gate_up_proj``, ``q_proj.weight``), so a
quantized base pairs with its bf16 fine-tune. The parts are hidden: they are not parameters, so they are out of
``numel`` and every rollup. Each format's layout and formula is in its module's doc (docs/formats.md says the
same for users):

- ``mxfp4`` (gpt-oss experts): :mod:`~ckptdiff.io.views.quant.mxfp4`;
- ``ct-int``, ``ct-fp8``, ``ct-int8`` (compressed-tensors, ModelOpt, fbgemm FP8):
  :mod:`~ckptdiff.io.views.quant.compressed`;
- ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8`` (bitsandbytes): :mod:`~ckptdiff.io.views.quant.bnb`;
- ``gptq``, ``awq`` (GEMM): :mod:`~ckptdiff.io.views.quant.gptq`.

Each format module holds its codec(s) and its ``Format`` (how its weights are found); ``base`` what they share
(:class:`QuantInfo`, :class:`Codec`, :class:`Refusal`, the ``Format`` protocol); ``recognise`` the table of formats
tried in order and the rules for every format (unknown quant_method, orphaned parts, layouts not dequantized);
``source`` the views (:class:`QuantSource`, :class:`StoredSource`, :func:`wrap`, :class:`Stats`).

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

from ckptdiff.io.views.quant.base import HINT, Codec, QuantInfo, Refusal
from ckptdiff.io.views.quant.recognise import FORMATS, KNOWN_METHODS
from ckptdiff.io.views.quant.source import QuantSource, Stats, StoredSource, as_stored, find, stored_wanted, wrap

__all__ = [
    "FORMATS",
    "HINT",
    "KNOWN_METHODS",
    "Codec",
    "QuantInfo",
    "QuantSource",
    "Refusal",
    "Stats",
    "StoredSource",
    "as_stored",
    "find",
    "stored_wanted",
    "wrap",
]
