"""Tensor names of real checkpoints -> (layer, module, expert): one table per model family.

The names are copied from the checkpoints' safetensors indexes (Hugging Face layouts); the expected module is what
the rollups group by, the expert what the ``expert`` column holds.
"""

from __future__ import annotations

import pytest

from ckptdiff.naming import expert_of, is_linear, layer_of, module_of

Row = tuple[str, int | None, str, str]

LLAMA: list[Row] = [
    ("model.embed_tokens.weight", None, "embed", ""),
    ("model.layers.0.self_attn.q_proj.weight", 0, "q", ""),
    ("model.layers.0.self_attn.k_proj.weight", 0, "k", ""),
    ("model.layers.0.self_attn.v_proj.weight", 0, "v", ""),
    ("model.layers.0.self_attn.o_proj.weight", 0, "o", ""),
    ("model.layers.12.mlp.gate_proj.weight", 12, "gate", ""),
    ("model.layers.12.mlp.up_proj.weight", 12, "up", ""),
    ("model.layers.12.mlp.down_proj.weight", 12, "down", ""),
    ("model.layers.31.input_layernorm.weight", 31, "norm", ""),
    ("model.layers.31.post_attention_layernorm.weight", 31, "norm", ""),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", 0, "other", ""),
    ("model.norm.weight", None, "norm", ""),
    ("lm_head.weight", None, "lm_head", ""),
]
QWEN2_QWEN3: list[Row] = [
    ("model.layers.3.self_attn.q_proj.bias", 3, "q", ""),
    ("model.layers.3.self_attn.k_proj.bias", 3, "k", ""),
    ("model.layers.3.self_attn.v_proj.bias", 3, "v", ""),
    ("model.layers.3.self_attn.q_norm.weight", 3, "norm", ""),
    ("model.layers.3.self_attn.k_norm.weight", 3, "norm", ""),
]
QWEN3_MOE: list[Row] = [
    ("model.layers.5.mlp.gate.weight", 5, "router", ""),
    ("model.layers.5.mlp.experts.17.gate_proj.weight", 5, "gate", "17"),
    ("model.layers.5.mlp.experts.17.up_proj.weight", 5, "up", "17"),
    ("model.layers.5.mlp.experts.127.down_proj.weight", 5, "down", "127"),
    ("model.layers.5.self_attn.o_proj.weight", 5, "o", ""),
]
QWEN2_MOE: list[Row] = [
    ("model.layers.2.mlp.gate.weight", 2, "router", ""),
    ("model.layers.2.mlp.experts.59.down_proj.weight", 2, "down", "59"),
    ("model.layers.2.mlp.shared_expert.gate_proj.weight", 2, "gate", "shared"),
    ("model.layers.2.mlp.shared_expert.up_proj.weight", 2, "up", "shared"),
    ("model.layers.2.mlp.shared_expert.down_proj.weight", 2, "down", "shared"),
    ("model.layers.2.mlp.shared_expert_gate.weight", 2, "shared_expert_gate", ""),
]
DEEPSEEK_V3: list[Row] = [
    ("model.layers.0.self_attn.q_a_proj.weight", 0, "q", ""),
    ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", 0, "q", ""),
    ("model.layers.0.self_attn.q_a_layernorm.weight", 0, "norm", ""),
    ("model.layers.0.self_attn.q_b_proj.weight", 0, "q", ""),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 0, "kv", ""),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", 0, "norm", ""),
    ("model.layers.0.self_attn.kv_b_proj.weight", 0, "kv", ""),
    ("model.layers.0.self_attn.o_proj.weight", 0, "o", ""),
    ("model.layers.0.mlp.gate_proj.weight", 0, "gate", ""),  # layers 0-2 are dense
    ("model.layers.3.mlp.gate.weight", 3, "router", ""),
    ("model.layers.3.mlp.gate.e_score_correction_bias", 3, "router", ""),
    ("model.layers.3.mlp.experts.0.gate_proj.weight", 3, "gate", "0"),
    ("model.layers.3.mlp.experts.255.down_proj.weight", 3, "down", "255"),
    ("model.layers.3.mlp.experts.255.down_proj.weight_scale_inv", 3, "down", "255"),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", 3, "up", "shared"),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", 3, "down", "shared"),
    ("model.layers.61.eh_proj.weight", 61, "other", ""),  # the multi-token-prediction module
    ("model.layers.61.enorm.weight", 61, "norm", ""),
    ("model.layers.61.hnorm.weight", 61, "norm", ""),
    ("model.layers.61.embed_tokens.weight", 61, "embed", ""),
    ("model.layers.61.shared_head.head.weight", 61, "lm_head", ""),
    ("model.layers.61.shared_head.norm.weight", 61, "norm", ""),
]
MIXTRAL: list[Row] = [
    ("model.layers.7.block_sparse_moe.gate.weight", 7, "router", ""),
    ("model.layers.7.block_sparse_moe.experts.3.w1.weight", 7, "gate", "3"),
    ("model.layers.7.block_sparse_moe.experts.3.w2.weight", 7, "down", "3"),
    ("model.layers.7.block_sparse_moe.experts.3.w3.weight", 7, "up", "3"),
]
FUSED_EXPERTS: list[Row] = [  # gpt-oss / Llama 4: every expert in one tensor; io.views.moe slices it as NAME[e]
    ("model.layers.0.mlp.router.weight", 0, "router", ""),
    ("model.layers.0.mlp.router.bias", 0, "router", ""),
    ("model.layers.0.mlp.experts.gate_up_proj", 0, "gate_up", ""),
    ("model.layers.0.mlp.experts.gate_up_proj[3]", 0, "gate_up", "3"),
    ("model.layers.0.mlp.experts.gate_up_proj_bias[3]", 0, "gate_up", "3"),
    ("model.layers.0.mlp.experts.down_proj[31]", 0, "down", "31"),
    ("model.layers.0.self_attn.sinks", 0, "other", ""),
    ("language_model.model.layers.4.feed_forward.router.weight", 4, "router", ""),
    ("language_model.model.layers.4.feed_forward.experts.gate_up_proj[15]", 4, "gate_up", "15"),
    ("language_model.model.layers.4.feed_forward.shared_expert.down_proj.weight", 4, "down", "shared"),
]
GEMMA: list[Row] = [
    ("model.layers.1.pre_feedforward_layernorm.weight", 1, "norm", ""),
    ("model.layers.1.post_feedforward_layernorm.weight", 1, "norm", ""),
    ("model.layers.1.mlp.gate_proj.weight", 1, "gate", ""),
    ("language_model.model.layers.5.mlp.down_proj.weight", 5, "down", ""),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight", 0, "o", ""),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", 0, "up", ""),
]
GPT2: list[Row] = [
    ("transformer.wte.weight", None, "embed", ""),
    ("transformer.wpe.weight", None, "pos_embed", ""),
    ("transformer.h.0.ln_1.weight", 0, "norm", ""),
    ("transformer.h.0.attn.c_attn.weight", 0, "qkv", ""),
    ("transformer.h.0.attn.c_proj.weight", 0, "o", ""),
    ("transformer.h.0.attn.bias", 0, "other", ""),
    ("transformer.h.0.ln_2.bias", 0, "norm", ""),
    ("transformer.h.11.mlp.c_fc.weight", 11, "up", ""),
    ("transformer.h.11.mlp.c_proj.weight", 11, "down", ""),
    ("transformer.ln_f.weight", None, "norm", ""),
]
GPT_NEOX: list[Row] = [
    ("gpt_neox.embed_in.weight", None, "embed", ""),
    ("gpt_neox.layers.0.input_layernorm.weight", 0, "norm", ""),
    ("gpt_neox.layers.0.attention.query_key_value.weight", 0, "qkv", ""),
    ("gpt_neox.layers.0.attention.dense.weight", 0, "o", ""),
    ("gpt_neox.layers.0.attention.rotary_emb.inv_freq", 0, "other", ""),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 0, "up", ""),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", 0, "down", ""),
    ("gpt_neox.final_layer_norm.weight", None, "norm", ""),
    ("embed_out.weight", None, "lm_head", ""),
]
PHI: list[Row] = [
    ("model.layers.0.self_attn.q_proj.weight", 0, "q", ""),
    ("model.layers.0.self_attn.dense.weight", 0, "o", ""),  # phi-2
    ("model.layers.0.mlp.fc1.weight", 0, "up", ""),
    ("model.layers.0.mlp.fc2.weight", 0, "down", ""),
    ("model.final_layernorm.weight", None, "norm", ""),
    ("model.layers.0.self_attn.qkv_proj.weight", 0, "qkv", ""),  # phi-3
    ("model.layers.0.mlp.gate_up_proj.weight", 0, "gate_up", ""),
]
BERT: list[Row] = [
    ("bert.embeddings.word_embeddings.weight", None, "embed", ""),
    ("bert.embeddings.position_embeddings.weight", None, "pos_embed", ""),
    ("bert.embeddings.token_type_embeddings.weight", None, "embed", ""),
    ("bert.embeddings.LayerNorm.weight", None, "norm", ""),
    ("bert.encoder.layer.0.attention.self.query.weight", 0, "q", ""),
    ("bert.encoder.layer.0.attention.self.key.weight", 0, "k", ""),
    ("bert.encoder.layer.0.attention.self.value.bias", 0, "v", ""),
    ("bert.encoder.layer.0.attention.output.dense.weight", 0, "o", ""),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", 0, "norm", ""),
    ("bert.encoder.layer.0.intermediate.dense.weight", 0, "up", ""),
    ("bert.encoder.layer.0.output.dense.weight", 0, "down", ""),
    ("bert.encoder.layer.11.output.LayerNorm.bias", 11, "norm", ""),
    ("bert.pooler.dense.weight", None, "other", ""),
    ("cls.predictions.transform.dense.weight", None, "other", ""),
    ("cls.predictions.decoder.weight", None, "lm_head", ""),
]
TABLES = {
    "llama": LLAMA,
    "qwen2-qwen3": QWEN2_QWEN3,
    "qwen3-moe": QWEN3_MOE,
    "qwen2-moe": QWEN2_MOE,
    "deepseek-v3": DEEPSEEK_V3,
    "mixtral": MIXTRAL,
    "fused-experts": FUSED_EXPERTS,
    "gemma": GEMMA,
    "gpt2": GPT2,
    "gpt-neox": GPT_NEOX,
    "phi": PHI,
    "bert": BERT,
}
CASES = [pytest.param(*row, id=f"{family}:{row[0]}") for family, rows in TABLES.items() for row in rows]


@pytest.mark.parametrize(("name", "layer", "module", "expert"), CASES)
def test_layer_module_expert(name: str, layer: int | None, module: str, expert: str) -> None:
    assert (layer_of(name), module_of(name), expert_of(name)) == (layer, module, expert)


def test_bert_ffn_matrices_are_linear_up_and_down() -> None:
    up, down = "bert.encoder.layer.3.intermediate.dense.weight", "bert.encoder.layer.3.output.dense.weight"
    assert (module_of(up), module_of(down)) == ("up", "down")
    assert is_linear(up, (3072, 768)) and is_linear(down, (768, 3072))
    assert not is_linear("bert.encoder.layer.3.output.LayerNorm.weight", (768,))
