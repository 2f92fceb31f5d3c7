"""Tensor names -> layer index, module type and MoE expert, for rollups.

Covers Hugging Face Llama/Qwen2/Qwen3/Mistral/Gemma/Phi names (``model.layers.N.self_attn.q_proj.weight``),
DeepSeek-V3's MLA projections (``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``), GPT-2
(``transformer.h.N.attn.c_attn.weight``), GPT-NeoX (``gpt_neox.layers.N.attention.query_key_value``), BERT
(``bert.encoder.layer.N.attention.self.query``, ``intermediate.dense``, ``output.dense``) and mixture-of-experts
layouts: routed experts ``...experts.E.down_proj.weight`` (Mixtral, Qwen-MoE, DeepSeek), shared experts
(``shared_experts.`` in DeepSeek, ``shared_expert.`` in Qwen2-MoE), routers (``mlp.gate``,
``block_sparse_moe.gate``, ``router``) and slices of fused expert tensors (``experts.gate_up_proj[E]``, see
:mod:`ckptdiff.io.views.moe`). Anything unrecognised is module ``other``. ``tests/test_naming.py`` pins every rule
against the names of real checkpoints.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder\.layers|encoder\.layers)\.(\d+)(?:\.|$|\[)")

# A routed expert's index: ``experts.7.`` in a name, or the ``[7]`` slice of a fused expert tensor.
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
_FUSED_SLICE = re.compile(r"(?:^|\.)experts\.[^.\[]+\[(\d+)\]$")
_SHARED = re.compile(r"(?:^|\.)shared_experts?(?:\.|$)")
_SLICE = re.compile(r"\[\d+\]$")

# Parameter names that end a tensor name without naming a module.
_PARAMS = frozenset({"weight", "bias", "scale", "e_score_correction_bias", "weight_scale_inv", "weight_scale"})
# Parents of a bare ``gate`` that make it an MoE router (``mlp.gate.weight``, ``block_sparse_moe.gate.weight``).
_MOE_BLOCKS = frozenset({"mlp", "block_sparse_moe", "moe", "feed_forward", "ffn"})
_ATTENTION = frozenset({"attn", "self_attn", "attention", "self_attention"})

# (module type, name fragments matched against the dotted parts): first hit wins, order matters.
_MODULES: list[tuple[str, tuple[str, ...]]] = [
    ("shared_expert_gate", ("shared_expert_gate",)),
    ("router", ("router",)),
    ("qkv", ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv")),
    ("q", ("q_proj", "query", "wq", "q_a_proj", "q_b_proj")),
    ("k", ("k_proj", "key", "wk")),
    ("v", ("v_proj", "value", "wv")),
    ("kv", ("kv_a_proj_with_mqa", "kv_b_proj")),
    ("o", ("o_proj", "out_proj", "wo")),
    ("gate_up", ("gate_up_proj",)),
    ("gate", ("gate_proj", "w1")),
    ("up", ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h")),
    ("down", ("down_proj", "w2", "fc2", "dense_4h_to_h")),
    ("embed", ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "token_type_embeddings")),
    ("pos_embed", ("embed_positions", "wpe", "position_embeddings")),
    ("lm_head", ("lm_head", "embed_out", "output", "shared_head")),
]

# What ``tie_word_embeddings`` ties: the output head, and the input token embeddings it may share (Llama/Qwen,
# GPT-2, BERT/Bloom, GPT-NeoX).
OUTPUT_EMBEDDING = "lm_head.weight"
_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name, or None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> str:
    """The MoE expert a tensor belongs to: its routed index (``'7'``), ``'shared'``, or ``''`` outside experts.

    ``...experts.7.down_proj.weight`` and the slice ``...experts.down_proj[7]`` of a fused expert tensor are
    expert ``'7'``; ``shared_experts.`` (DeepSeek) and ``shared_expert.`` (Qwen2-MoE) are ``'shared'``. Routers
    and ``shared_expert_gate`` belong to no expert.
    """
    m = _EXPERT.search(name) or _FUSED_SLICE.search(name)
    if m:
        return m.group(1)
    return "shared" if _SHARED.search(name) else ""


def _is_norm(part: str) -> bool:
    low = part.lower()
    return low.endswith(("norm", "ln", "layernorm")) or low.startswith(("ln_", "norm"))


def _dense(stem: list[str]) -> str:
    """The module of a ``dense`` projection: attention output, BERT's FFN (intermediate / output), or other."""
    parent = stem[-2] if len(stem) > 1 else ""
    if parent == "intermediate":  # BERT: intermediate.dense is the FFN's up projection
        return "up"
    if any(p in _ATTENTION for p in stem):  # GPT-NeoX / Phi attention.dense, BERT attention.output.dense
        return "o"
    if parent == "output":  # BERT: layer.N.output.dense is the FFN's down projection
        return "down"
    return "other"  # BERT's pooler.dense, cls.predictions.transform.dense


def module_of(name: str) -> str:
    """A short module type: q, k, v, o, qkv, kv, gate, up, down, gate_up, router, shared_expert_gate, embed,
    pos_embed, lm_head, norm, other."""
    parts = [_SLICE.sub("", p) for p in name.split(".")]
    stem = parts[:-1] if len(parts) > 1 and parts[-1] in _PARAMS else parts
    stem = [p.removesuffix("_bias") if p.endswith("_proj_bias") else p for p in stem]  # gpt-oss gate_up_proj_bias
    if any(_is_norm(p) for p in stem):
        return "norm"
    if "c_proj" in stem:  # GPT-2 uses c_proj for both the attention output and the MLP output
        return "o" if any(p in _ATTENTION for p in stem) else "down"
    if len(stem) > 1 and stem[-1] == "gate" and stem[-2] in _MOE_BLOCKS:  # MoE router: mlp.gate.weight
        return "router"
    if stem and stem[-1] == "dense":
        return _dense(stem)
    if len(stem) > 1 and stem[-1] == "decoder" and stem[-2] == "predictions":  # BERT's MLM head
        return "lm_head"
    for module, fragments in _MODULES:
        if any(p in fragments for p in stem):
            return module
    return "other"


def is_input_embedding(name: str) -> bool:
    """Whether a tensor name is an input token embedding's weight (``model.embed_tokens.weight``, ``wte.weight``)."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-1] == "weight" and parts[-2] in _INPUT_EMBEDDINGS


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D matrix inside a transformer block: what PNT's tables focus on."""
    return len(shape) == 2 and layer_of(name) is not None and module_of(name) != "norm"


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """Glob filter: kept if it matches any include (or there are none) and no exclude."""
    if include and not any(fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatchcase(name, g) for g in exclude)


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders layers.2 before layers.10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
