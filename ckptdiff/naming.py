"""Tensor names -> stack, layer index, module type and MoE expert, for rollups.

Every rule is one row of a table below, read first row first: :data:`STACK_RULES` (which part of a model a tensor
belongs to: decoder, encoder, vision, audio, projector, mtp, head), :data:`MODULE_RULES` (what a tensor is: q, k,
v, o, qkv, gate, up, down, ...). A row names the dotted parts of a tensor name it matches (``q_proj`` in
``model.layers.0.self_attn.q_proj.weight``) and, where a part means different things in different places, the part
it must sit in (``wo`` in T5's ``DenseReluDense`` is the FFN's down projection, in Meta's ``attention`` the
attention output). docs/inputs.md shows the tables; ``tests/test_naming.py`` pins every row against the names of
real checkpoints. Anything unrecognised is module ``other``.

The stack is a fact about a checkpoint, not one name: :func:`stacks` reads every name at once, puts names no stack
rule claims (``lm_head.weight``, ``model.embed_tokens.weight``) in the checkpoint's main stack, finds DeepSeek's
multi-token-prediction layers (the ``layers.N`` that hold an ``eh_proj``), and leaves the stack empty everywhere
when the checkpoint has only one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder\.layers|encoder\.layers)\.(\d+)(?:\.|$|\[)")

# A routed expert's index: ``experts.7.`` in a name, or the ``[7]`` slice of a fused expert tensor.
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
_FUSED_SLICE = re.compile(r"(?:^|\.)experts\.[^.\[]+\[(\d+)\]$")
_SHARED = re.compile(r"(?:^|\.)shared_experts?(?:\.|$)")
_SLICE = re.compile(r"\[\d+\]$")

# Parameter names that end a tensor name without naming a module.
_PARAMS = frozenset({"weight", "bias", "scale", "e_score_correction_bias", "weight_scale_inv", "weight_scale"})
_ATTENTION = ("attn", "self_attn", "attention", "self_attention", "SelfAttention", "EncDecAttention", "encoder_attn")
# Parents of a bare ``gate`` that make it an MoE router (``mlp.gate.weight``, ``block_sparse_moe.gate.weight``).
_MOE_BLOCKS = ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")


@dataclass(frozen=True)
class Rule:
    """One naming rule: a tensor whose name has one of ``parts`` (a dotted part, e.g. ``q_proj``) is ``label``.

    ``parent``: only where the part just before it is one of these; ``within``: only where some part before it is
    one of these; ``root``: only as the first part of the name; ``not_parent``: never right after one of these.
    ``seen_in`` says which checkpoints use it (documentation; docs/inputs.md prints the tables).
    """

    label: str
    parts: tuple[str, ...]
    seen_in: str
    parent: tuple[str, ...] = ()
    within: tuple[str, ...] = ()
    root: bool = False
    not_parent: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """Where the part must sit, in words (the docs' rule tables print it)."""

        def listed(parts: tuple[str, ...]) -> str:
            return ", ".join(f"`{p}`" for p in parts)

        said = ["first part of the name"] if self.root else []
        said += [f"right after {listed(self.parent)}"] if self.parent else []
        said += [f"after {listed(self.within)}"] if self.within else []
        said += [f"not right after {listed(self.not_parent)}"] if self.not_parent else []
        return "; ".join(said) or "anywhere"

    def matches(self, parts: list[str]) -> bool:
        """Whether one of ``parts`` (a tensor name split at dots) is what this rule names, in the right place."""
        return any(p in self.parts and self.fits(parts, i) for i, p in enumerate(parts))

    def fits(self, parts: list[str], i: int) -> bool:
        """Whether ``parts[i]``, one of this rule's parts, sits where the rule asks."""
        if self.root and i != 0:
            return False
        before = parts[i - 1] if i else ""
        if self.parent and before not in self.parent:
            return False
        if self.not_parent and before in self.not_parent:
            return False
        return not self.within or any(q in self.within for q in parts[:i])


def _first(rules: tuple[Rule, ...], by_part: dict[str, list[tuple[int, Rule]]], parts: list[str]) -> Rule | None:
    """The first row of ``rules`` that matches ``parts`` (``by_part``: each part's rows with their positions, so
    that a name is read once rather than once per row)."""
    best: tuple[int, Rule] | None = None
    for i, p in enumerate(parts):
        for k, rule in by_part.get(p, ()):
            if (best is None or k < best[0]) and rule.fits(parts, i):
                best = (k, rule)
    return best[1] if best is not None else None


def _by_part(rules: tuple[Rule, ...]) -> dict[str, list[tuple[int, Rule]]]:
    out: dict[str, list[tuple[int, Rule]]] = {}
    for k, rule in enumerate(rules):
        for p in rule.parts:
            out.setdefault(p, []).append((k, rule))
    return out


# Stacks, in the order the rollup tables list them (the order data flows through a multimodal model).
STACKS = ("vision", "audio", "encoder", "projector", "decoder", "mtp", "head")

# Which stack a tensor belongs to: first matching row wins. Names no row claims go to the checkpoint's main stack
# (see :func:`stacks`).
STACK_RULES: tuple[Rule, ...] = (
    Rule(
        "head",
        ("score", "classifier", "classification_head", "qa_outputs", "v_head"),
        "sequence-classification and reward models (Llama, Qwen, Mistral, BERT, RoBERTa, BART "
        "...ForSequenceClassification; trl value heads)",
        root=True,
    ),
    Rule("head", ("out_proj",), "GPT-NeoX reward model (OpenAssistant oasst-rm)", root=True),
    Rule(
        "projector",
        ("multi_modal_projector", "mm_projector", "connector", "merger", "deepstack_merger_list"),
        "Gemma 3, LLaVA, Llama 4, Qwen2-VL/2.5-VL (visual.merger), Idefics2/3 (connector)",
    ),
    Rule("projector", ("mlp1",), "InternVL (mlp1: LayerNorm, Linear, GELU, Linear)", root=True),
    Rule("projector", ("visual_projection", "text_projection"), "CLIP (both towers into the joint space)", root=True),
    Rule(
        "vision",
        ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"),
        "Gemma 3 / LLaVA (vision_tower), Llama 4 / Idefics / InternVL (vision_model), Qwen2-VL (visual)",
    ),
    Rule("audio", ("audio_tower", "audio_model", "audio_encoder"), "Qwen2-Audio, Gemma 3n, Qwen2.5-Omni"),
    Rule("mtp", ("mtp", "mtp_layers"), "Qwen3-Next (mtp.layers.N), MiMo (model.mtp_layers.N)"),
    Rule("encoder", ("encoder",), "T5 (encoder.block.N), BART / Whisper (model.encoder.layers.N), BERT"),
    Rule(
        "decoder",
        ("decoder",),
        "T5 (decoder.block.N), BART / Whisper (model.decoder.layers.N)",
        not_parent=("predictions",),
    ),
    Rule(
        "decoder",
        ("language_model", "text_model"),
        "Gemma 3, LLaVA, Llama 4, InternVL (language_model), Idefics2/3 (text_model); a text tower whose blocks "
        "are under encoder. (CLIP's text_model) is an encoder",
    ),
)

# What a tensor is: first matching row wins (norms first: any part ending in norm/ln/layernorm, see _is_norm).
MODULE_RULES: tuple[Rule, ...] = (
    Rule("norm", ("0",), "InternVL (mlp1.0 is its projector's LayerNorm)", parent=("mlp1",)),
    Rule(
        "head",
        ("score", "classifier", "classification_head", "qa_outputs", "v_head"),
        "sequence-classification and reward models",
        root=True,
    ),
    Rule("head", ("out_proj",), "GPT-NeoX reward model (OpenAssistant oasst-rm)", root=True),
    Rule("shared_expert_gate", ("shared_expert_gate",), "Qwen2-MoE"),
    Rule("router", ("router",), "gpt-oss, Llama 4"),
    Rule("router", ("gate",), "Mixtral, Qwen-MoE, DeepSeek, OLMoE (the MoE block's bare gate)", parent=_MOE_BLOCKS),
    Rule("lm_head", ("shared_head",), "DeepSeek-V3 MTP (shared_head.head)"),
    Rule(
        "embed",
        ("patch_embed", "patch_embedding", "class_embedding", "token_embedding"),
        "Qwen2-VL (patch_embed), SigLIP / CLIP / InternVL / Llama 4 (patch_embedding, class_embedding)",
    ),
    Rule("embed", ("conv1", "conv2"), "Whisper (the encoder's convolutional front end)", parent=("encoder",)),
    Rule(
        "pos_embed",
        (
            "embed_positions",
            "wpe",
            "position_embeddings",
            "position_embedding",
            "positional_embedding_vlm",
            "relative_attention_bias",
        ),
        "GPT-2, BERT, BART, Whisper, SigLIP/CLIP, InternVL, Llama 4 vision, T5 (relative_attention_bias)",
    ),
    Rule(
        "qkv",
        ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv", "qkv"),
        "Phi-3, GPT-2, GPT-NeoX/Falcon, Qwen2-VL / InternVL vision (attn.qkv)",
    ),
    Rule("q", ("q_proj", "query", "wq", "q_a_proj", "q_b_proj"), "Llama and most decoders, BERT, DeepSeek MLA"),
    Rule("q", ("q",), "T5 (SelfAttention.q, EncDecAttention.q)", parent=_ATTENTION),
    Rule("k", ("k_proj", "key", "wk"), "Llama and most decoders, BERT"),
    Rule("k", ("k",), "T5", parent=_ATTENTION),
    Rule("v", ("v_proj", "value", "wv"), "Llama and most decoders, BERT"),
    Rule("v", ("v",), "T5", parent=_ATTENTION),
    Rule("kv", ("kv_a_proj_with_mqa", "kv_b_proj"), "DeepSeek-V2/V3 MLA"),
    Rule("o", ("o",), "T5", parent=_ATTENTION),
    Rule("o", ("proj",), "Qwen2-VL / InternVL vision (attn.proj)", parent=_ATTENTION),
    Rule("o", ("c_proj",), "GPT-2 (attn.c_proj)", within=_ATTENTION),
    Rule("down", ("c_proj",), "GPT-2 (mlp.c_proj)"),
    Rule("up", ("dense",), "BERT (intermediate.dense)", parent=("intermediate",)),
    Rule("o", ("dense",), "GPT-NeoX / Phi-2 (attention.dense), BERT (attention.output.dense)", within=_ATTENTION),
    Rule("down", ("dense",), "BERT (output.dense)", parent=("output",)),
    Rule("down", ("wo",), "T5 (DenseReluDense.wo)", parent=("DenseReluDense",)),
    Rule("o", ("o_proj", "out_proj", "wo"), "Llama, BART / Whisper / SigLIP (out_proj), Meta's Llama (wo)"),
    Rule("gate_up", ("gate_up_proj",), "Phi-3, gpt-oss, Llama 4"),
    Rule("gate", ("gate_proj", "w1", "wi_0"), "Llama, Mixtral (w1), T5 v1.1 (DenseReluDense.wi_0)"),
    Rule(
        "up",
        ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "wi", "wi_1"),
        "Llama, Mixtral (w3), BART / Whisper / SigLIP / Phi-2 (fc1), GPT-2, GPT-NeoX, T5 (wi, wi_1)",
    ),
    Rule("down", ("down_proj", "w2", "fc2", "dense_4h_to_h"), "Llama, Mixtral (w2), BART / SigLIP (fc2), GPT-NeoX"),
    Rule(
        "embed",
        ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "token_type_embeddings", "shared"),
        "Llama, GPT-2, BERT, GPT-NeoX, T5 / BART (shared)",
    ),
    Rule("lm_head", ("decoder",), "BERT (cls.predictions.decoder)", parent=("predictions",)),
    Rule("lm_head", ("lm_head", "embed_out", "output", "proj_out"), "Llama, GPT-NeoX (embed_out), Whisper (proj_out)"),
    Rule("proj", ("eh_proj",), "DeepSeek-V3 MTP (eh_proj: embedding and hidden state into one)"),
    Rule("proj", ("visual_projection", "text_projection"), "CLIP", root=True),
    Rule(
        "proj",
        (
            "multi_modal_projector",
            "mm_projector",
            "merger",
            "deepstack_merger_list",
            "connector",
            "mlp1",
            "modality_projection",
        ),
        "the projector's other matrices: LLaVA (linear_1/2), Gemma 3 (mm_input_projection_weight), Qwen2-VL "
        "(merger.mlp.N), Idefics3 (modality_projection.proj), InternVL (mlp1.N)",
    ),
)

_STACKS_BY_PART = _by_part(STACK_RULES)
_MODULES_BY_PART = _by_part(MODULE_RULES)

# A ``layers.N`` that holds one of these parts is a multi-token-prediction layer (DeepSeek-V3, GLM-4.5).
_MTP_LAYER = re.compile(r"^(.*?(?:^|\.)layers\.\d+)\.(?:eh_proj|enorm|hnorm)(?:\.|$)")
# The prefix of a text tower, up to its name (``model.text_model``), for :func:`stacks`.
_TEXT_TOWER = re.compile(r"^((?:.*\.)?(?:text_model|language_model))\.")
# Modules that are never a linear layer of a block, wherever they sit (MTP's embed_tokens and shared head, T5's
# relative position bias).
_NOT_LINEAR = frozenset({"norm", "embed", "pos_embed", "lm_head", "head"})

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


@functools.lru_cache(maxsize=4096)
def _is_norm(part: str) -> bool:
    """A part that names a normalisation: an underscore-separated word ending in ``norm`` or the word ``ln``
    (``input_layernorm``, ``layer_norm1``, ``LayerNorm``, ``ln_f``, ``enorm``, ``pre_fc_norm_embedding``)."""
    words = [w.rstrip("0123456789") for w in part.lower().split("_")]
    return any(w.endswith("norm") or w == "ln" for w in words)


def _parts(name: str) -> list[str]:
    """The dotted parts of a name that say what it is: slices and a trailing parameter name dropped."""
    parts = [_SLICE.sub("", p) if p.endswith("]") else p for p in name.split(".")]
    stem = parts[:-1] if len(parts) > 1 and parts[-1] in _PARAMS else parts
    return [p.removesuffix("_bias") if p.endswith("_proj_bias") else p for p in stem]  # gpt-oss gate_up_proj_bias


@functools.lru_cache(maxsize=1 << 18)
def module_of(name: str) -> str:
    """A short module type (see :data:`MODULE_RULES`): q, k, v, o, qkv, kv, gate, up, down, gate_up, router,
    shared_expert_gate, embed, pos_embed, lm_head, head, proj, norm, other."""
    if any(_is_norm(p) for p in _parts(name)):
        return "norm"
    rule = module_rule(name)
    return rule.label if rule is not None else "other"


def module_rule(name: str) -> Rule | None:
    """The row of :data:`MODULE_RULES` that decides a name's module (None: a norm by its own name, or other)."""
    stem = _parts(name)
    if any(_is_norm(p) for p in stem):
        return None
    return _first(MODULE_RULES, _MODULES_BY_PART, stem)


def stack_rule(name: str) -> Rule | None:
    """The row of :data:`STACK_RULES` that claims a name (None: the checkpoint's main stack decides)."""
    return _first(STACK_RULES, _STACKS_BY_PART, name.split("."))


def stack_of(name: str) -> str:
    """The stack a name's own parts place it in (see :data:`STACK_RULES`), or '' when no rule claims it.

    A checkpoint's stacks come from :func:`stacks`, which also reads the other names.
    """
    rule = stack_rule(name)
    return rule.label if rule is not None else ""


def stacks(names: Iterable[str]) -> dict[str, str]:
    """Every name's stack within its checkpoint: '' for all when the checkpoint has one stack.

    Names no stack rule claims (``lm_head.weight``, ``model.layers.N`` of a decoder-only model, T5's
    ``shared.weight``) belong to the main stack: ``encoder`` for an encoder-only model (BERT), else ``decoder``.
    The ``layers.N`` that hold an ``eh_proj``, ``enorm`` or ``hnorm`` (DeepSeek-V3's multi-token-prediction
    layer, ``model.layers.61`` in V3) are ``mtp``, every tensor under them included.
    """
    names = list(names)
    hints = ("eh_proj", "enorm", "hnorm")
    mtp = {m.group(1) + "." for n in names if any(h in n for h in hints) and (m := _MTP_LAYER.match(n))}
    own = {n: ("mtp" if mtp and n.startswith(tuple(mtp)) else stack_of(n)) for n in names}
    # A text tower (text_model., language_model.) whose blocks are an encoder (CLIP's text_model.encoder.layers.N)
    # is an encoder: its embeddings and final norm go with its blocks.
    towers: dict[str, set[str]] = {}
    for n in names:
        if ("text_model" in n or "language_model" in n) and (m := _TEXT_TOWER.match(n)) is not None:
            towers.setdefault(m.group(1), set()).update(n[m.end() :].split("."))
    encoders = tuple(t + "." for t, parts in towers.items() if "encoder" in parts and "decoder" not in parts)
    if encoders:
        own = {n: "encoder" if s == "decoder" and n.startswith(encoders) else s for n, s in own.items()}
    claimed = set(own.values()) - {""}
    main = "encoder" if "encoder" in claimed and "decoder" not in claimed else "decoder"
    out = {n: s or main for n, s in own.items()}
    if len(set(out.values())) <= 1:
        return dict.fromkeys(names, "")
    return out


def stack_rank(stack: str) -> int:
    """Where a stack sorts in the rollup tables (:data:`STACKS` order; '' first)."""
    return STACKS.index(stack) + 1 if stack in STACKS else 0


def is_input_embedding(name: str) -> bool:
    """Whether a tensor name is an input token embedding's weight (``model.embed_tokens.weight``, ``wte.weight``)."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-1] == "weight" and parts[-2] in _INPUT_EMBEDDINGS


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D matrix inside a transformer block that is a linear layer: what PNT's tables focus on (norms,
    embeddings, position biases and output heads inside a block, such as an MTP layer's, are not)."""
    return len(shape) == 2 and layer_of(name) is not None and module_of(name) not in _NOT_LINEAR


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """Glob filter: kept if it matches any include (or there are none) and no exclude."""
    if include and not any(fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatchcase(name, g) for g in exclude)


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders layers.2 before layers.10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
