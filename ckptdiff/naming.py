"""Tensor names -> layer index and module type, for rollups.

Covers Hugging Face Llama/Qwen/Mistral/Gemma/DeepSeek names (``model.layers.N.self_attn.q_proj.weight``),
GPT-2 style (``transformer.h.N.attn.c_attn.weight``), GPT-NeoX (``gpt_neox.layers.N.attention.query_key_value``)
and MoE experts (``...mlp.experts.E.down_proj.weight``). Anything unrecognised is module ``other``.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder\.layers|encoder\.layers)\.(\d+)(?:\.|$)")

# (module type, name fragments matched against the dotted parts): first hit wins, order matters.
_MODULES: list[tuple[str, tuple[str, ...]]] = [
    ("qkv", ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv")),
    ("q", ("q_proj", "query", "wq", "q_a_proj", "q_b_proj")),
    ("k", ("k_proj", "key", "wk")),
    ("v", ("v_proj", "value", "wv")),
    ("kv", ("kv_a_proj_with_mqa", "kv_b_proj")),
    ("o", ("o_proj", "out_proj", "wo", "dense")),
    ("gate_up", ("gate_up_proj",)),
    ("router", ("router",)),
    ("gate", ("gate_proj", "w1")),
    ("up", ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h")),
    ("down", ("down_proj", "w2", "fc2", "dense_4h_to_h")),
    ("embed", ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")),
    ("pos_embed", ("embed_positions", "wpe", "position_embeddings")),
    ("lm_head", ("lm_head", "embed_out", "output")),
]


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name, or None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """A short module type: q, k, v, o, qkv, gate, up, down, embed, lm_head, norm, router, other."""
    parts = name.split(".")
    stem = parts[:-1] if len(parts) > 1 and parts[-1] in ("weight", "bias", "scale") else parts
    if any(p.endswith(("norm", "ln", "layernorm")) or p.startswith(("ln_", "norm")) for p in stem):
        return "norm"
    if "c_proj" in stem:  # GPT-2 uses c_proj for both the attention output and the MLP output
        return "o" if any(p in ("attn", "self_attn", "attention") for p in stem) else "down"
    if "gate" in stem and "mlp" in stem and stem[-1] == "gate":  # MoE router: mlp.gate.weight
        return "router"
    for module, fragments in _MODULES:
        if any(p in fragments for p in stem):
            return module
    return "other"


def param_of(name: str) -> str:
    """'weight', 'bias' or the last dotted part."""
    return name.rsplit(".", 1)[-1]


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
