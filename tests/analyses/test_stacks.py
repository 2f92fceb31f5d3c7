"""Rollups per (stack, layer) and (stack, module): an encoder-decoder's blocks, a vision tower's layers and an MTP
layer are never merged with the decoder's (issue 20 item 5).

The checkpoints are tiny, with the real tensor names of T5 (google/flan-t5-base), Gemma 3 (google/gemma-3-4b-it)
and DeepSeek-V3 (deepseek-ai/DeepSeek-V3); every changed count is planted, so the expected rollups are known by
construction.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import ckptdiff
from ckptdiff.cli import app

D = 8


def _matrix(seed: int, rows: int = D, cols: int = D) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _plant(sd: dict[str, torch.Tensor], changes: dict[str, int]) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` where the first ``n`` entries of each named tensor are moved by +1 (a change in any dtype)."""
    out = {k: v.clone() for k, v in sd.items()}
    for name, n in changes.items():
        flat = out[name].reshape(-1)
        flat[:n] += 1.0
    return out


def _pair(root: Path, sd: dict[str, torch.Tensor], changes: dict[str, int]) -> tuple[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    base, ft = root / "base.safetensors", root / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(base))
    save_file({k: v.contiguous() for k, v in _plant(sd, changes).items()}, str(ft))
    return str(base), str(ft)


def _t5() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {"shared.weight": _matrix(0, 20, D), "lm_head.weight": _matrix(1, 20, D)}
    seed = 2
    for side, attn in (("encoder", "SelfAttention"), ("decoder", "EncDecAttention")):
        for b in range(2):
            p = f"{side}.block.{b}"
            for m in ("q", "k", "v", "o"):
                sd[f"{p}.layer.0.SelfAttention.{m}.weight"] = _matrix(seed := seed + 1)
            if attn == "EncDecAttention":
                sd[f"{p}.layer.1.EncDecAttention.q.weight"] = _matrix(seed := seed + 1)
            ffn = 1 if side == "encoder" else 2
            sd[f"{p}.layer.{ffn}.DenseReluDense.wi_0.weight"] = _matrix(seed := seed + 1, 16, D)
            sd[f"{p}.layer.{ffn}.DenseReluDense.wi_1.weight"] = _matrix(seed := seed + 1, 16, D)
            sd[f"{p}.layer.{ffn}.DenseReluDense.wo.weight"] = _matrix(seed := seed + 1, D, 16)
            sd[f"{p}.layer.0.layer_norm.weight"] = torch.ones(D)
        sd[f"{side}.final_layer_norm.weight"] = torch.ones(D)
    return sd


T5_CHANGES = {
    "encoder.block.0.layer.0.SelfAttention.q.weight": 5,
    "decoder.block.0.layer.0.SelfAttention.q.weight": 3,
    "decoder.block.0.layer.1.EncDecAttention.q.weight": 2,
    "encoder.block.1.layer.1.DenseReluDense.wo.weight": 7,
    "decoder.block.1.layer.2.DenseReluDense.wi_0.weight": 4,
}


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return _pair(tmp_path_factory.mktemp("t5"), _t5(), T5_CHANGES)


def _expected(frame: pd.DataFrame, key: str) -> dict[tuple[str, object], int]:
    """Σchanged per (stack, key) from the planted changes and the names' own stack/key columns (a plain loop)."""
    out: dict[tuple[str, object], int] = {}
    for _, row in frame.iterrows():
        if key == "layer" and pd.isna(row["layer"]):
            continue
        k = (str(row["stack"]), int(row["layer"]) if key == "layer" else row[key])
        out[k] = out.get(k, 0) + T5_CHANGES.get(str(row["tensor"]), 0)
    return out


def test_t5_encoder_and_decoder_blocks_are_separate_rows(t5_pair: tuple[str, str]) -> None:
    res = ckptdiff.sparsity(*t5_pair, progress=False)
    frame = res.to_frame()
    assert set(frame["stack"]) == {"encoder", "decoder"}
    by_layer = res.by("layer")
    assert list(by_layer.index.names) == ["stack", "layer"]
    assert list(by_layer.index) == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    assert by_layer["changed"].to_dict() == _expected(frame, "layer")
    assert by_layer.loc[("encoder", 0), "changed"] == 5 and by_layer.loc[("decoder", 0), "changed"] == 3 + 2
    by_module = res.by("module")
    assert by_module.loc[("encoder", "q"), "changed"] == 5
    assert by_module.loc[("decoder", "q"), "changed"] == 5  # self-attention q and cross-attention q
    assert by_module.loc[("encoder", "down"), "changed"] == 7  # DenseReluDense.wo is the FFN's down projection
    assert by_module.loc[("decoder", "gate"), "changed"] == 4
    grid = res.grid()
    assert list(grid.index) == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]


def test_a_filter_does_not_change_the_stack(t5_pair: tuple[str, str]) -> None:
    """--include decoder.*: the rows are the decoder's alone, still labelled decoder (the stack is read from every
    name of the checkpoint, before filtering), and still per (stack, layer)."""
    res = ckptdiff.sparsity(*t5_pair, include=["decoder.*"], progress=False)
    assert set(res.to_frame()["stack"]) == {"decoder"}
    assert list(res.by("layer").index) == [("decoder", 0), ("decoder", 1)]


def test_t5_svd_and_consistency_rollups_keep_stacks(t5_pair: tuple[str, str]) -> None:
    keys = [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    principal = ckptdiff.principal_overlap(*t5_pair, k=2, progress=False).by("layer")
    assert list(principal.index) == keys
    assert principal.loc[("encoder", 0), "changed"] == 5 and principal.loc[("decoder", 0), "changed"] == 5
    spectral = ckptdiff.spectral(*t5_pair, k=2, progress=False).by("layer")
    assert list(spectral.index) == keys
    assert list(spectral["matrices"]) == [7, 7, 8, 8]  # per block: q k v o, the cross-attention q (decoder), 3 FFN
    base, ft = t5_pair
    consistency = ckptdiff.consistency(base, [ft, ft], progress=False).by("layer")
    assert list(consistency.index) == keys


def test_t5_terminal_tables_name_the_stack(t5_pair: tuple[str, str]) -> None:
    res = CliRunner().invoke(app, ["sparsity", *t5_pair, "-q"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    grid = res.stdout.split("Sparsity, layer x module")[1]
    assert "stack" in grid and "encoder" in grid and "decoder" in grid


def _gemma3() -> dict[str, torch.Tensor]:
    return {
        "language_model.model.embed_tokens.weight": _matrix(0, 20, D),
        "language_model.model.layers.0.self_attn.q_proj.weight": _matrix(1),
        "language_model.model.layers.0.mlp.down_proj.weight": _matrix(2),
        "language_model.model.layers.0.input_layernorm.weight": torch.ones(D),
        "vision_tower.vision_model.embeddings.patch_embedding.weight": _matrix(3, D, 3 * 4).reshape(D, 3, 2, 2),
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": _matrix(4),
        "vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight": _matrix(5),
        "vision_tower.vision_model.encoder.layers.0.layer_norm1.weight": torch.ones(D),
        "multi_modal_projector.mm_input_projection_weight": _matrix(6),
        "multi_modal_projector.mm_soft_emb_norm.weight": torch.ones(D),
    }


def test_vision_layer_is_not_the_text_layer(tmp_path: Path) -> None:
    """The defect: "layer 0 q changed" summed the vision tower's layer 0 into the text decoder's."""
    changes = {
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": 6,
        "language_model.model.layers.0.self_attn.q_proj.weight": 1,
        "multi_modal_projector.mm_input_projection_weight": 2,
    }
    res = ckptdiff.sparsity(*_pair(tmp_path, _gemma3(), changes), progress=False)
    by_module = res.by("module")
    assert by_module.loc[("vision", "q"), "changed"] == 6
    assert by_module.loc[("decoder", "q"), "changed"] == 1
    assert by_module.loc[("projector", "proj"), "changed"] == 2
    by_layer = res.by("layer")
    assert list(by_layer.index) == [("vision", 0), ("decoder", 0)]  # vision first, as data flows
    assert list(by_layer["changed"]) == [6, 1]


def test_one_stack_looks_as_before(tmp_path: Path) -> None:
    """A decoder-only checkpoint: the CSV's stack column is empty, no table has a stack level or column."""
    sd = {
        "model.embed_tokens.weight": _matrix(0, 20, D),
        "model.layers.0.self_attn.q_proj.weight": _matrix(1),
        "model.layers.1.self_attn.q_proj.weight": _matrix(2),
        "model.norm.weight": torch.ones(D),
        "lm_head.weight": _matrix(3, 20, D),
    }
    pair = _pair(tmp_path, sd, {"model.layers.1.self_attn.q_proj.weight": 3})
    res = ckptdiff.sparsity(*pair, progress=False)
    assert set(res.to_frame()["stack"]) == {""}
    assert res.by("layer").index.names == ["layer"] and res.by("module").index.names == ["module"]
    assert list(res.by("layer")["changed"]) == [0, 3]
    assert list(res.grid().index) == [0, 1]
    out = CliRunner().invoke(app, ["sparsity", *pair, "-q"], env={"COLUMNS": "100"}).stdout
    tables = out.split("Overall (parameter-weighted)")[1]  # after the header (whose paths name this test)
    assert "stack" not in tables and "Per module type" in tables


def _deepseek_mtp() -> dict[str, torch.Tensor]:
    """Layer 0 of the decoder and the MTP layer (model.layers.1 here; model.layers.61 in V3)."""
    return {
        "model.embed_tokens.weight": _matrix(0, 20, D),
        "model.layers.0.self_attn.q_a_proj.weight": _matrix(1),
        "model.layers.0.mlp.down_proj.weight": _matrix(2),
        "model.layers.1.embed_tokens.weight": _matrix(3, 20, D),
        "model.layers.1.enorm.weight": torch.ones(D),
        "model.layers.1.hnorm.weight": torch.ones(D),
        "model.layers.1.eh_proj.weight": _matrix(4, D, 2 * D),
        "model.layers.1.self_attn.q_a_proj.weight": _matrix(5),
        "model.layers.1.shared_head.head.weight": _matrix(6, 20, D),
        "model.layers.1.shared_head.norm.weight": torch.ones(D),
        "model.norm.weight": torch.ones(D),
        "lm_head.weight": _matrix(7, 20, D),
    }


def test_mtp_layer_is_its_own_stack_and_its_embed_and_head_are_not_linear(tmp_path: Path) -> None:
    changes = {
        "model.layers.1.embed_tokens.weight": 11,
        "model.layers.1.shared_head.head.weight": 13,
        "model.layers.1.eh_proj.weight": 2,
        "model.layers.0.self_attn.q_a_proj.weight": 1,
    }
    res = ckptdiff.sparsity(*_pair(tmp_path, _deepseek_mtp(), changes), progress=False)
    frame = res.to_frame().set_index("tensor")
    assert set(frame.loc[[n for n in frame.index if n.startswith("model.layers.1.")], "stack"]) == {"mtp"}
    assert frame.loc["model.layers.0.mlp.down_proj.weight", "stack"] == "decoder"
    assert not frame.loc["model.layers.1.embed_tokens.weight", "linear"]
    assert not frame.loc["model.layers.1.shared_head.head.weight", "linear"]
    assert frame.loc["model.layers.1.eh_proj.weight", "linear"]
    lin = res.linear_only()
    assert lin["changed"] == 2 + 1  # eh_proj and the decoder's q_a_proj; not the MTP embedding or head
    assert res.by("layer")["changed"].to_dict() == {("decoder", 0): 1, ("mtp", 1): 11 + 13 + 2}
