"""Tensor names of real checkpoints -> (stack, layer, module, expert): one list per checkpoint.

Each list is names of one real checkpoint, copied from its Hub safetensors index (``model.safetensors.index.json``)
or from the module tree of its transformers modeling file (the state-dict names are the attribute paths); the
comment above each list says which. The stack comes from the whole list (:func:`ckptdiff.naming.stacks`: empty when
the checkpoint has one stack); the expected module is what the rollups group by, the expert what the ``expert``
column holds.
"""

from __future__ import annotations

import pytest

from ckptdiff.naming import (
    MODULE_RULES,
    STACK_RULES,
    expert_of,
    is_linear,
    layer_of,
    module_of,
    module_rule,
    stack_rule,
    stacks,
)

Row = tuple[str, str, int | None, str, str]  # name, stack, layer, module, expert

# meta-llama/Meta-Llama-3-8B: model.safetensors.index.json
LLAMA: list[Row] = [
    ("model.embed_tokens.weight", "", None, "embed", ""),
    ("model.layers.0.self_attn.q_proj.weight", "", 0, "q", ""),
    ("model.layers.0.self_attn.k_proj.weight", "", 0, "k", ""),
    ("model.layers.0.self_attn.v_proj.weight", "", 0, "v", ""),
    ("model.layers.0.self_attn.o_proj.weight", "", 0, "o", ""),
    ("model.layers.12.mlp.gate_proj.weight", "", 12, "gate", ""),
    ("model.layers.12.mlp.up_proj.weight", "", 12, "up", ""),
    ("model.layers.12.mlp.down_proj.weight", "", 12, "down", ""),
    ("model.layers.31.input_layernorm.weight", "", 31, "norm", ""),
    ("model.layers.31.post_attention_layernorm.weight", "", 31, "norm", ""),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "", 0, "other", ""),
    ("model.norm.weight", "", None, "norm", ""),
    ("lm_head.weight", "", None, "lm_head", ""),
]
# mistralai/Mistral-7B-v0.1: model.safetensors.index.json (Llama's names)
MISTRAL: list[Row] = [
    ("model.embed_tokens.weight", "", None, "embed", ""),
    ("model.layers.7.self_attn.k_proj.weight", "", 7, "k", ""),
    ("model.layers.7.mlp.gate_proj.weight", "", 7, "gate", ""),
    ("model.layers.7.post_attention_layernorm.weight", "", 7, "norm", ""),
    ("lm_head.weight", "", None, "lm_head", ""),
]
# Qwen/Qwen2.5-7B: model.safetensors.index.json (biases on q/k/v)
QWEN25: list[Row] = [
    ("model.layers.3.self_attn.q_proj.bias", "", 3, "q", ""),
    ("model.layers.3.self_attn.k_proj.bias", "", 3, "k", ""),
    ("model.layers.3.self_attn.v_proj.bias", "", 3, "v", ""),
    ("model.layers.3.mlp.up_proj.weight", "", 3, "up", ""),
]
# Qwen/Qwen3-8B: model.safetensors.index.json (q_norm, k_norm)
QWEN3: list[Row] = [
    ("model.layers.3.self_attn.q_norm.weight", "", 3, "norm", ""),
    ("model.layers.3.self_attn.k_norm.weight", "", 3, "norm", ""),
    ("model.layers.3.self_attn.o_proj.weight", "", 3, "o", ""),
]
# Qwen/Qwen3-30B-A3B: model.safetensors.index.json
QWEN3_MOE: list[Row] = [
    ("model.layers.5.mlp.gate.weight", "", 5, "router", ""),
    ("model.layers.5.mlp.experts.17.gate_proj.weight", "", 5, "gate", "17"),
    ("model.layers.5.mlp.experts.17.up_proj.weight", "", 5, "up", "17"),
    ("model.layers.5.mlp.experts.127.down_proj.weight", "", 5, "down", "127"),
    ("model.layers.5.self_attn.o_proj.weight", "", 5, "o", ""),
]
# Qwen/Qwen1.5-MoE-A2.7B (Qwen2MoeForCausalLM): model.safetensors.index.json
QWEN2_MOE: list[Row] = [
    ("model.layers.2.mlp.gate.weight", "", 2, "router", ""),
    ("model.layers.2.mlp.experts.59.down_proj.weight", "", 2, "down", "59"),
    ("model.layers.2.mlp.shared_expert.gate_proj.weight", "", 2, "gate", "shared"),
    ("model.layers.2.mlp.shared_expert.up_proj.weight", "", 2, "up", "shared"),
    ("model.layers.2.mlp.shared_expert.down_proj.weight", "", 2, "down", "shared"),
    ("model.layers.2.mlp.shared_expert_gate.weight", "", 2, "shared_expert_gate", ""),
]
# allenai/OLMoE-1B-7B-0924: model.safetensors.index.json
OLMOE: list[Row] = [
    ("model.layers.4.mlp.gate.weight", "", 4, "router", ""),
    ("model.layers.4.mlp.experts.63.up_proj.weight", "", 4, "up", "63"),
    ("model.layers.4.self_attn.q_norm.weight", "", 4, "norm", ""),
    ("model.layers.4.self_attn.k_proj.weight", "", 4, "k", ""),
]
# deepseek-ai/DeepSeek-V3: model.safetensors.index.json (61 decoder layers, model.layers.61 is the MTP layer)
DEEPSEEK_V3: list[Row] = [
    ("model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.layers.0.self_attn.q_a_proj.weight", "decoder", 0, "q", ""),
    ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", "decoder", 0, "q", ""),
    ("model.layers.0.self_attn.q_a_layernorm.weight", "decoder", 0, "norm", ""),
    ("model.layers.0.self_attn.q_b_proj.weight", "decoder", 0, "q", ""),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "decoder", 0, "kv", ""),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", "decoder", 0, "norm", ""),
    ("model.layers.0.self_attn.kv_b_proj.weight", "decoder", 0, "kv", ""),
    ("model.layers.0.self_attn.o_proj.weight", "decoder", 0, "o", ""),
    ("model.layers.0.mlp.gate_proj.weight", "decoder", 0, "gate", ""),  # layers 0-2 are dense
    ("model.layers.3.mlp.gate.weight", "decoder", 3, "router", ""),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "decoder", 3, "router", ""),
    ("model.layers.3.mlp.experts.0.gate_proj.weight", "decoder", 3, "gate", "0"),
    ("model.layers.3.mlp.experts.255.down_proj.weight", "decoder", 3, "down", "255"),
    ("model.layers.3.mlp.experts.255.down_proj.weight_scale_inv", "decoder", 3, "down", "255"),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", "decoder", 3, "up", "shared"),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", "decoder", 3, "down", "shared"),
    ("model.layers.60.mlp.experts.9.up_proj.weight", "decoder", 60, "up", "9"),
    ("model.norm.weight", "decoder", None, "norm", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
    ("model.layers.61.embed_tokens.weight", "mtp", 61, "embed", ""),  # the multi-token-prediction module
    ("model.layers.61.enorm.weight", "mtp", 61, "norm", ""),
    ("model.layers.61.hnorm.weight", "mtp", 61, "norm", ""),
    ("model.layers.61.eh_proj.weight", "mtp", 61, "proj", ""),
    ("model.layers.61.input_layernorm.weight", "mtp", 61, "norm", ""),
    ("model.layers.61.self_attn.q_a_proj.weight", "mtp", 61, "q", ""),
    ("model.layers.61.mlp.experts.7.gate_proj.weight", "mtp", 61, "gate", "7"),
    ("model.layers.61.mlp.shared_experts.down_proj.weight", "mtp", 61, "down", "shared"),
    ("model.layers.61.shared_head.head.weight", "mtp", 61, "lm_head", ""),
    ("model.layers.61.shared_head.norm.weight", "mtp", 61, "norm", ""),
]
# Qwen/Qwen3-Next-80B-A3B-Instruct: model.safetensors.index.json (its MTP layers live under mtp.)
QWEN3_NEXT: list[Row] = [
    ("model.layers.0.mlp.experts.3.down_proj.weight", "decoder", 0, "down", "3"),
    ("model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("mtp.layers.0.self_attn.q_proj.weight", "mtp", 0, "q", ""),
    ("mtp.layers.0.mlp.experts.3.down_proj.weight", "mtp", 0, "down", "3"),
    ("mtp.pre_fc_norm_embedding.weight", "mtp", None, "norm", ""),
    ("mtp.fc.weight", "mtp", None, "other", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
]
# mistralai/Mixtral-8x7B-v0.1: model.safetensors.index.json
MIXTRAL: list[Row] = [
    ("model.layers.7.block_sparse_moe.gate.weight", "", 7, "router", ""),
    ("model.layers.7.block_sparse_moe.experts.3.w1.weight", "", 7, "gate", "3"),
    ("model.layers.7.block_sparse_moe.experts.3.w2.weight", "", 7, "down", "3"),
    ("model.layers.7.block_sparse_moe.experts.3.w3.weight", "", 7, "up", "3"),
]
# openai/gpt-oss-20b as transformers names it (GptOssForCausalLM): every expert in one tensor, which
# io.views.moe slices as NAME[e]
GPT_OSS: list[Row] = [
    ("model.layers.0.mlp.router.weight", "", 0, "router", ""),
    ("model.layers.0.mlp.router.bias", "", 0, "router", ""),
    ("model.layers.0.mlp.experts.gate_up_proj", "", 0, "gate_up", ""),
    ("model.layers.0.mlp.experts.gate_up_proj[3]", "", 0, "gate_up", "3"),
    ("model.layers.0.mlp.experts.gate_up_proj_bias[3]", "", 0, "gate_up", "3"),
    ("model.layers.0.mlp.experts.down_proj[31]", "", 0, "down", "31"),
    ("model.layers.0.self_attn.sinks", "", 0, "other", ""),
]
# meta-llama/Llama-4-Scout-17B-16E: model.safetensors.index.json (text decoder, vision tower, projector)
LLAMA4: list[Row] = [
    ("language_model.model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("language_model.model.layers.4.self_attn.q_proj.weight", "decoder", 4, "q", ""),
    ("language_model.model.layers.4.feed_forward.router.weight", "decoder", 4, "router", ""),
    ("language_model.model.layers.4.feed_forward.experts.gate_up_proj[15]", "decoder", 4, "gate_up", "15"),
    ("language_model.model.layers.4.feed_forward.shared_expert.down_proj.weight", "decoder", 4, "down", "shared"),
    ("language_model.model.layers.4.input_layernorm.weight", "decoder", 4, "norm", ""),
    ("language_model.lm_head.weight", "decoder", None, "lm_head", ""),
    ("vision_model.class_embedding", "vision", None, "embed", ""),
    ("vision_model.positional_embedding_vlm", "vision", None, "pos_embed", ""),
    ("vision_model.patch_embedding.linear.weight", "vision", None, "embed", ""),
    ("vision_model.layernorm_pre.weight", "vision", None, "norm", ""),
    ("vision_model.model.layers.4.self_attn.q_proj.weight", "vision", 4, "q", ""),
    ("vision_model.model.layers.4.self_attn.o_proj.weight", "vision", 4, "o", ""),
    ("vision_model.model.layers.4.input_layernorm.weight", "vision", 4, "norm", ""),
    ("vision_model.model.layers.4.mlp.fc1.weight", "vision", 4, "up", ""),
    ("vision_model.model.layers.4.mlp.fc2.weight", "vision", 4, "down", ""),
    ("vision_model.vision_adapter.mlp.fc1.weight", "vision", None, "up", ""),
    ("multi_modal_projector.linear_1.weight", "projector", None, "proj", ""),
]
# google/gemma-2-9b: model.safetensors.index.json
GEMMA2: list[Row] = [
    ("model.layers.1.pre_feedforward_layernorm.weight", "", 1, "norm", ""),
    ("model.layers.1.post_feedforward_layernorm.weight", "", 1, "norm", ""),
    ("model.layers.1.mlp.gate_proj.weight", "", 1, "gate", ""),
]
# google/gemma-3-4b-it: model.safetensors.index.json (SigLIP vision tower, projector, text decoder)
GEMMA3: list[Row] = [
    ("language_model.model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("language_model.model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("language_model.model.layers.0.self_attn.q_norm.weight", "decoder", 0, "norm", ""),
    ("language_model.model.layers.5.mlp.down_proj.weight", "decoder", 5, "down", ""),
    ("language_model.model.norm.weight", "decoder", None, "norm", ""),
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", "vision", None, "embed", ""),
    ("vision_tower.vision_model.embeddings.position_embedding.weight", "vision", None, "pos_embed", ""),
    ("vision_tower.vision_model.encoder.layers.0.layer_norm1.weight", "vision", 0, "norm", ""),
    ("vision_tower.vision_model.encoder.layers.0.layer_norm2.bias", "vision", 0, "norm", ""),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision", 0, "q", ""),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight", "vision", 0, "o", ""),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision", 0, "up", ""),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight", "vision", 0, "down", ""),
    ("vision_tower.vision_model.post_layernorm.weight", "vision", None, "norm", ""),
    ("multi_modal_projector.mm_input_projection_weight", "projector", None, "proj", ""),
    ("multi_modal_projector.mm_soft_emb_norm.weight", "projector", None, "norm", ""),
]
# Qwen/Qwen2-VL-7B-Instruct: model.safetensors.index.json
QWEN2_VL: list[Row] = [
    ("model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("model.layers.27.mlp.down_proj.weight", "decoder", 27, "down", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
    ("visual.patch_embed.proj.weight", "vision", None, "embed", ""),
    ("visual.blocks.0.norm1.weight", "vision", 0, "norm", ""),
    ("visual.blocks.0.attn.qkv.weight", "vision", 0, "qkv", ""),
    ("visual.blocks.0.attn.proj.weight", "vision", 0, "o", ""),
    ("visual.blocks.0.mlp.fc1.weight", "vision", 0, "up", ""),
    ("visual.blocks.0.mlp.fc2.bias", "vision", 0, "down", ""),
    ("visual.merger.ln_q.weight", "projector", None, "norm", ""),
    ("visual.merger.mlp.0.weight", "projector", None, "proj", ""),
    ("visual.merger.mlp.2.weight", "projector", None, "proj", ""),
]
# Qwen/Qwen2.5-VL-7B-Instruct as transformers >= 4.52 saves it (model.visual, model.language_model)
QWEN25_VL: list[Row] = [
    ("model.language_model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("model.language_model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.visual.blocks.0.mlp.gate_proj.weight", "vision", 0, "gate", ""),
    ("model.visual.blocks.0.mlp.up_proj.weight", "vision", 0, "up", ""),
    ("model.visual.blocks.0.mlp.down_proj.weight", "vision", 0, "down", ""),
    ("model.visual.merger.mlp.0.weight", "projector", None, "proj", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
]
# llava-hf/llava-1.5-7b-hf: model.safetensors.index.json (CLIP vision tower; CLIP spells pre_layrnorm so)
LLAVA: list[Row] = [
    ("language_model.model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("language_model.lm_head.weight", "decoder", None, "lm_head", ""),
    ("vision_tower.vision_model.embeddings.class_embedding", "vision", None, "embed", ""),
    ("vision_tower.vision_model.embeddings.position_embedding.weight", "vision", None, "pos_embed", ""),
    ("vision_tower.vision_model.pre_layrnorm.weight", "vision", None, "norm", ""),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight", "vision", 0, "k", ""),
    ("multi_modal_projector.linear_1.weight", "projector", None, "proj", ""),
    ("multi_modal_projector.linear_2.bias", "projector", None, "proj", ""),
]
# HuggingFaceM4/Idefics3-8B-Llama3: model.safetensors.index.json
IDEFICS3: list[Row] = [
    ("model.vision_model.embeddings.patch_embedding.weight", "vision", None, "embed", ""),
    ("model.vision_model.encoder.layers.3.self_attn.q_proj.weight", "vision", 3, "q", ""),
    ("model.vision_model.encoder.layers.3.layer_norm1.weight", "vision", 3, "norm", ""),
    ("model.vision_model.post_layernorm.weight", "vision", None, "norm", ""),
    ("model.connector.modality_projection.proj.weight", "projector", None, "proj", ""),
    ("model.text_model.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.text_model.layers.3.self_attn.q_proj.weight", "decoder", 3, "q", ""),
    ("model.text_model.norm.weight", "decoder", None, "norm", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
]
# OpenGVLab/InternVL2-8B: model.safetensors.index.json (InternViT, mlp1 projector, InternLM2 decoder)
INTERNVL: list[Row] = [
    ("vision_model.embeddings.class_embedding", "vision", None, "embed", ""),
    ("vision_model.embeddings.position_embedding", "vision", None, "pos_embed", ""),
    ("vision_model.encoder.layers.0.attn.qkv.weight", "vision", 0, "qkv", ""),
    ("vision_model.encoder.layers.0.attn.proj.weight", "vision", 0, "o", ""),
    ("vision_model.encoder.layers.0.norm1.weight", "vision", 0, "norm", ""),
    ("vision_model.encoder.layers.0.ls1", "vision", 0, "other", ""),
    ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision", 0, "up", ""),
    ("mlp1.0.weight", "projector", None, "norm", ""),
    ("mlp1.1.weight", "projector", None, "proj", ""),
    ("mlp1.3.weight", "projector", None, "proj", ""),
    ("language_model.model.tok_embeddings.weight", "decoder", None, "embed", ""),
    ("language_model.model.layers.0.attention.wqkv.weight", "decoder", 0, "qkv", ""),
    ("language_model.model.layers.0.attention.wo.weight", "decoder", 0, "o", ""),
    ("language_model.model.layers.0.feed_forward.w1.weight", "decoder", 0, "gate", ""),
    ("language_model.model.layers.0.feed_forward.w2.weight", "decoder", 0, "down", ""),
    ("language_model.model.layers.0.attention_norm.weight", "decoder", 0, "norm", ""),
    ("language_model.output.weight", "decoder", None, "lm_head", ""),
]
# Qwen/Qwen2-Audio-7B: model.safetensors.index.json (Whisper-like audio tower, projector, Qwen decoder)
QWEN2_AUDIO: list[Row] = [
    ("audio_tower.conv1.weight", "audio", None, "other", ""),
    ("audio_tower.layers.0.self_attn.q_proj.weight", "audio", 0, "q", ""),
    ("audio_tower.layers.0.fc1.weight", "audio", 0, "up", ""),
    ("multi_modal_projector.linear.weight", "projector", None, "proj", ""),
    ("language_model.model.layers.0.self_attn.q_proj.weight", "decoder", 0, "q", ""),
]
# openai/clip-vit-base-patch32: model.safetensors (CLIPModel: a text encoder, a vision encoder, two projections)
CLIP: list[Row] = [
    ("text_model.embeddings.token_embedding.weight", "encoder", None, "embed", ""),
    ("text_model.embeddings.position_embedding.weight", "encoder", None, "pos_embed", ""),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "encoder", 0, "q", ""),
    ("text_model.encoder.layers.0.mlp.fc1.weight", "encoder", 0, "up", ""),
    ("text_model.final_layer_norm.weight", "encoder", None, "norm", ""),
    ("vision_model.embeddings.class_embedding", "vision", None, "embed", ""),
    ("vision_model.pre_layrnorm.weight", "vision", None, "norm", ""),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision", 0, "q", ""),
    ("visual_projection.weight", "projector", None, "proj", ""),
    ("text_projection.weight", "projector", None, "proj", ""),
    ("logit_scale", "encoder", None, "other", ""),
]
# google/flan-t5-base (T5 v1.1 layout: gated wi_0/wi_1): model.safetensors; google-t5/t5-small for wi
T5: list[Row] = [
    ("shared.weight", "decoder", None, "embed", ""),
    ("encoder.embed_tokens.weight", "encoder", None, "embed", ""),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder", 0, "q", ""),
    ("encoder.block.0.layer.0.SelfAttention.k.weight", "encoder", 0, "k", ""),
    ("encoder.block.0.layer.0.SelfAttention.v.weight", "encoder", 0, "v", ""),
    ("encoder.block.0.layer.0.SelfAttention.o.weight", "encoder", 0, "o", ""),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder", 0, "pos_embed", ""),
    ("encoder.block.0.layer.0.layer_norm.weight", "encoder", 0, "norm", ""),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "encoder", 0, "gate", ""),
    ("encoder.block.0.layer.1.DenseReluDense.wi_1.weight", "encoder", 0, "up", ""),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "encoder", 0, "down", ""),
    ("encoder.block.11.layer.1.DenseReluDense.wi.weight", "encoder", 11, "up", ""),  # t5-small
    ("encoder.final_layer_norm.weight", "encoder", None, "norm", ""),
    ("decoder.block.0.layer.0.SelfAttention.q.weight", "decoder", 0, "q", ""),
    ("decoder.block.0.layer.1.EncDecAttention.q.weight", "decoder", 0, "q", ""),
    ("decoder.block.0.layer.1.EncDecAttention.k.weight", "decoder", 0, "k", ""),
    ("decoder.block.0.layer.1.EncDecAttention.v.weight", "decoder", 0, "v", ""),
    ("decoder.block.0.layer.1.EncDecAttention.o.weight", "decoder", 0, "o", ""),
    ("decoder.block.0.layer.2.DenseReluDense.wi_0.weight", "decoder", 0, "gate", ""),
    ("decoder.block.0.layer.2.DenseReluDense.wo.weight", "decoder", 0, "down", ""),
    ("decoder.block.0.layer.2.layer_norm.weight", "decoder", 0, "norm", ""),
    ("decoder.final_layer_norm.weight", "decoder", None, "norm", ""),
    ("lm_head.weight", "decoder", None, "lm_head", ""),
]
# facebook/bart-large: model.safetensors (BartForConditionalGeneration)
BART: list[Row] = [
    ("model.shared.weight", "decoder", None, "embed", ""),
    ("model.encoder.embed_positions.weight", "encoder", None, "pos_embed", ""),
    ("model.encoder.layernorm_embedding.weight", "encoder", None, "norm", ""),
    ("model.encoder.layers.0.self_attn.q_proj.weight", "encoder", 0, "q", ""),
    ("model.encoder.layers.0.self_attn.out_proj.weight", "encoder", 0, "o", ""),
    ("model.encoder.layers.0.self_attn_layer_norm.weight", "encoder", 0, "norm", ""),
    ("model.encoder.layers.0.fc1.weight", "encoder", 0, "up", ""),
    ("model.encoder.layers.0.fc2.weight", "encoder", 0, "down", ""),
    ("model.decoder.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.decoder.layers.0.self_attn.k_proj.weight", "decoder", 0, "k", ""),
    ("model.decoder.layers.0.encoder_attn.q_proj.weight", "decoder", 0, "q", ""),
    ("model.decoder.layers.0.encoder_attn.out_proj.weight", "decoder", 0, "o", ""),
    ("model.decoder.layers.0.encoder_attn_layer_norm.weight", "decoder", 0, "norm", ""),
    ("model.decoder.layers.0.fc1.weight", "decoder", 0, "up", ""),
    ("final_logits_bias", "decoder", None, "other", ""),
]
# openai/whisper-small: model.safetensors (WhisperForConditionalGeneration)
WHISPER: list[Row] = [
    ("model.encoder.conv1.weight", "encoder", None, "embed", ""),
    ("model.encoder.conv2.bias", "encoder", None, "embed", ""),
    ("model.encoder.embed_positions.weight", "encoder", None, "pos_embed", ""),
    ("model.encoder.layers.0.self_attn.k_proj.weight", "encoder", 0, "k", ""),
    ("model.encoder.layers.0.final_layer_norm.weight", "encoder", 0, "norm", ""),
    ("model.encoder.layer_norm.weight", "encoder", None, "norm", ""),
    ("model.decoder.embed_tokens.weight", "decoder", None, "embed", ""),
    ("model.decoder.layers.0.encoder_attn.v_proj.weight", "decoder", 0, "v", ""),
    ("model.decoder.layers.0.fc2.weight", "decoder", 0, "down", ""),
    ("proj_out.weight", "decoder", None, "lm_head", ""),
]
# openai-community/gpt2: model.safetensors
GPT2: list[Row] = [
    ("transformer.wte.weight", "", None, "embed", ""),
    ("transformer.wpe.weight", "", None, "pos_embed", ""),
    ("transformer.h.0.ln_1.weight", "", 0, "norm", ""),
    ("transformer.h.0.attn.c_attn.weight", "", 0, "qkv", ""),
    ("transformer.h.0.attn.c_proj.weight", "", 0, "o", ""),
    ("transformer.h.0.attn.bias", "", 0, "other", ""),
    ("transformer.h.0.ln_2.bias", "", 0, "norm", ""),
    ("transformer.h.11.mlp.c_fc.weight", "", 11, "up", ""),
    ("transformer.h.11.mlp.c_proj.weight", "", 11, "down", ""),
    ("transformer.ln_f.weight", "", None, "norm", ""),
]
# EleutherAI/pythia-1b: model.safetensors
GPT_NEOX: list[Row] = [
    ("gpt_neox.embed_in.weight", "", None, "embed", ""),
    ("gpt_neox.layers.0.input_layernorm.weight", "", 0, "norm", ""),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "", 0, "qkv", ""),
    ("gpt_neox.layers.0.attention.dense.weight", "", 0, "o", ""),
    ("gpt_neox.layers.0.attention.rotary_emb.inv_freq", "", 0, "other", ""),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "", 0, "up", ""),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "", 0, "down", ""),
    ("gpt_neox.final_layer_norm.weight", "", None, "norm", ""),
    ("embed_out.weight", "", None, "lm_head", ""),
]
# OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1 (GPTNeoXRewardModel: gpt_neox + a scalar out_proj score head)
GPT_NEOX_REWARD: list[Row] = [
    ("gpt_neox.embed_in.weight", "decoder", None, "embed", ""),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "decoder", 0, "qkv", ""),
    ("gpt_neox.layers.0.attention.dense.weight", "decoder", 0, "o", ""),
    ("gpt_neox.final_layer_norm.weight", "decoder", None, "norm", ""),
    ("out_proj.weight", "head", None, "head", ""),
    ("out_proj.bias", "head", None, "head", ""),
]
# Skywork/Skywork-Reward-Llama-3.1-8B (LlamaForSequenceClassification): model.safetensors.index.json
LLAMA_REWARD: list[Row] = [
    ("model.layers.0.self_attn.o_proj.weight", "decoder", 0, "o", ""),
    ("model.norm.weight", "decoder", None, "norm", ""),
    ("score.weight", "head", None, "head", ""),
]
# tiiuae/falcon-7b: model.safetensors.index.json
FALCON: list[Row] = [
    ("transformer.word_embeddings.weight", "", None, "embed", ""),
    ("transformer.h.0.self_attention.query_key_value.weight", "", 0, "qkv", ""),
    ("transformer.h.0.self_attention.dense.weight", "", 0, "o", ""),
    ("transformer.h.0.mlp.dense_h_to_4h.weight", "", 0, "up", ""),
    ("transformer.h.0.mlp.dense_4h_to_h.weight", "", 0, "down", ""),
    ("transformer.h.0.input_layernorm.weight", "", 0, "norm", ""),
    ("lm_head.weight", "", None, "lm_head", ""),
]
# microsoft/phi-2: model.safetensors.index.json
PHI2: list[Row] = [
    ("model.layers.0.self_attn.q_proj.weight", "", 0, "q", ""),
    ("model.layers.0.self_attn.dense.weight", "", 0, "o", ""),
    ("model.layers.0.mlp.fc1.weight", "", 0, "up", ""),
    ("model.layers.0.mlp.fc2.weight", "", 0, "down", ""),
    ("model.final_layernorm.weight", "", None, "norm", ""),
]
# microsoft/Phi-3-mini-4k-instruct: model.safetensors.index.json
PHI3: list[Row] = [
    ("model.layers.0.self_attn.qkv_proj.weight", "", 0, "qkv", ""),
    ("model.layers.0.mlp.gate_up_proj.weight", "", 0, "gate_up", ""),
]
# google-bert/bert-base-uncased: model.safetensors (BertForPreTraining)
BERT: list[Row] = [
    ("bert.embeddings.word_embeddings.weight", "", None, "embed", ""),
    ("bert.embeddings.position_embeddings.weight", "", None, "pos_embed", ""),
    ("bert.embeddings.token_type_embeddings.weight", "", None, "embed", ""),
    ("bert.embeddings.LayerNorm.weight", "", None, "norm", ""),
    ("bert.encoder.layer.0.attention.self.query.weight", "", 0, "q", ""),
    ("bert.encoder.layer.0.attention.self.key.weight", "", 0, "k", ""),
    ("bert.encoder.layer.0.attention.self.value.bias", "", 0, "v", ""),
    ("bert.encoder.layer.0.attention.output.dense.weight", "", 0, "o", ""),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", "", 0, "norm", ""),
    ("bert.encoder.layer.0.intermediate.dense.weight", "", 0, "up", ""),
    ("bert.encoder.layer.0.output.dense.weight", "", 0, "down", ""),
    ("bert.encoder.layer.11.output.LayerNorm.bias", "", 11, "norm", ""),
    ("bert.pooler.dense.weight", "", None, "other", ""),
    ("cls.predictions.transform.dense.weight", "", None, "other", ""),
    ("cls.predictions.decoder.weight", "", None, "lm_head", ""),
]
# a BertForSequenceClassification fine-tune (e.g. textattack/bert-base-uncased-SST-2): the encoder and its classifier
BERT_CLASSIFIER: list[Row] = [
    ("bert.encoder.layer.0.attention.self.query.weight", "encoder", 0, "q", ""),
    ("bert.embeddings.word_embeddings.weight", "encoder", None, "embed", ""),
    ("bert.pooler.dense.weight", "encoder", None, "other", ""),
    ("classifier.weight", "head", None, "head", ""),
]
TABLES = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2.5": QWEN25,
    "qwen3": QWEN3,
    "qwen3-moe": QWEN3_MOE,
    "qwen2-moe": QWEN2_MOE,
    "olmoe": OLMOE,
    "deepseek-v3": DEEPSEEK_V3,
    "qwen3-next": QWEN3_NEXT,
    "mixtral": MIXTRAL,
    "gpt-oss": GPT_OSS,
    "llama4": LLAMA4,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "qwen2-vl": QWEN2_VL,
    "qwen2.5-vl": QWEN25_VL,
    "llava": LLAVA,
    "idefics3": IDEFICS3,
    "internvl": INTERNVL,
    "qwen2-audio": QWEN2_AUDIO,
    "clip": CLIP,
    "t5": T5,
    "bart": BART,
    "whisper": WHISPER,
    "gpt2": GPT2,
    "gpt-neox": GPT_NEOX,
    "gpt-neox-reward": GPT_NEOX_REWARD,
    "llama-reward": LLAMA_REWARD,
    "falcon": FALCON,
    "phi2": PHI2,
    "phi3": PHI3,
    "bert": BERT,
    "bert-classifier": BERT_CLASSIFIER,
}
CASES = [pytest.param(family, *row, id=f"{family}:{row[0]}") for family, rows in TABLES.items() for row in rows]


@pytest.mark.parametrize(("family", "name", "stack", "layer", "module", "expert"), CASES)
def test_stack_layer_module_expert(
    family: str, name: str, stack: str, layer: int | None, module: str, expert: str
) -> None:
    got = stacks(n for n, *_ in TABLES[family])[name]
    assert (got, layer_of(name), module_of(name), expert_of(name)) == (stack, layer, module, expert)


def test_every_naming_rule_decides_some_real_name() -> None:
    """Each row of the rule tables is what labels at least one name above: no rule is untested or unreachable."""
    names = [n for rows in TABLES.values() for n, *_ in rows]
    used_modules = {id(r) for n in names if (r := module_rule(n)) is not None}
    used_stacks = {id(r) for n in names if (r := stack_rule(n)) is not None}
    assert [r.seen_in for r in MODULE_RULES if id(r) not in used_modules] == []
    assert [r.seen_in for r in STACK_RULES if id(r) not in used_stacks] == []


def test_stacks_keep_encoder_decoder_and_vision_text_layers_apart() -> None:
    """The (stack, layer) key of T5's encoder block 0 and decoder block 0, and of Gemma 3's vision and text layer 0,
    differ; a decoder-only checkpoint has no stack at all."""
    t5 = stacks(n for n, *_ in T5)
    enc, dec = "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight"
    assert (t5[enc], layer_of(enc)) != (t5[dec], layer_of(dec))
    gemma = stacks(n for n, *_ in GEMMA3)
    vis, txt = (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
    )
    assert (gemma[vis], layer_of(vis)) != (gemma[txt], layer_of(txt))
    assert set(stacks(n for n, *_ in LLAMA).values()) == {""}


def test_mtp_embedding_and_head_are_not_linear_layers() -> None:
    """DeepSeek-V3's MTP layer holds its own embed_tokens and shared_head.head: matrices inside a layer, but an
    embedding and an output head, not linear layers of a block; its eh_proj is one."""
    assert not is_linear("model.layers.61.embed_tokens.weight", (129280, 7168))
    assert not is_linear("model.layers.61.shared_head.head.weight", (129280, 7168))
    assert is_linear("model.layers.61.eh_proj.weight", (7168, 14336))
    assert not is_linear("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 8))
    assert is_linear("encoder.block.0.layer.1.DenseReluDense.wo.weight", (512, 2048))


def test_bert_ffn_matrices_are_linear_up_and_down() -> None:
    up, down = "bert.encoder.layer.3.intermediate.dense.weight", "bert.encoder.layer.3.output.dense.weight"
    assert (module_of(up), module_of(down)) == ("up", "down")
    assert is_linear(up, (3072, 768)) and is_linear(down, (768, 3072))
    assert not is_linear("bert.encoder.layer.3.output.LayerNorm.weight", (768,))
