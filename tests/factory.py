"""Tiny checkpoints with differences known by construction, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_like(layers: int = 2, d: int = 16, ff: int = 32, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small Llama-style state dict in bf16 with HF names."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q", "k", "v", "o"):
            sd[f"{p}.self_attn.{m}_proj.weight"] = torch.randn(d, d, generator=g)
        sd[f"{p}.mlp.gate_proj.weight"] = torch.randn(ff, d, generator=g)
        sd[f"{p}.mlp.up_proj.weight"] = torch.randn(ff, d, generator=g)
        sd[f"{p}.mlp.down_proj.weight"] = torch.randn(d, ff, generator=g)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(d)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(d)
    sd["model.norm.weight"] = torch.ones(d)
    sd["lm_head.weight"] = torch.randn(vocab, d, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def bump_ulps(t: torch.Tensor, flat_idx: torch.Tensor, ulps: int = 1) -> torch.Tensor:
    """Copy of t with the entries at flat_idx moved by exactly `ulps` representable steps away from zero."""
    out = t.clone().reshape(-1)
    ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = out.view(ibits)
    bits[flat_idx] = bits[flat_idx] + ulps  # magnitude up by `ulps` steps for either sign
    return out.reshape(t.shape)


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, shard_sizes: list[int]) -> None:
    """Write sd as model-0000i-of-0000n.safetensors shards of the given tensor counts, plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    assert sum(shard_sizes) == len(names)
    weight_map: dict[str, str] = {}
    start = 0
    n = len(shard_sizes)
    for i, size in enumerate(shard_sizes):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in names[start : start + size]}
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
        start += size
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def save_single(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """Write one safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
