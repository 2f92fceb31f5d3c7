"""Tiny checkpoints with differences known by construction, for tests."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
from huggingface_hub.utils import TensorInfo as HubTensorInfo
from safetensors.torch import save_file

from ckptdiff.io.source import Source


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


EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def save_tied_bin(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """``torch.save`` of ``sd`` with lm_head.weight the very tensor model.embed_tokens.weight (a tied model's
    state dict): the archive holds one storage, viewed under both names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**sd, HEAD: sd[EMBED]}, path)
    return path


def save_tied_hf(sd: dict[str, torch.Tensor], folder: Path, config: dict[str, Any] | str | None) -> Path:
    """What ``save_pretrained`` writes for a tied model: model.safetensors without lm_head.weight, and
    ``config`` (a dict as JSON, a string as is, None for no file) as config.json."""
    save_single({k: v for k, v in sd.items() if k != HEAD}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


class CountingSource(Source):
    """Wraps a source and counts the bytes read per tensor; records whether it was closed."""

    def __init__(self, inner: Source):
        super().__init__(inner.spec, inner.resolved, dict(inner.infos))
        self.inner = inner
        self.bytes: Counter[str] = Counter()
        self.closed = 0
        self._lock = threading.Lock()

    def read(self, name: str, start: int = 0, count: int | None = None, out: np.ndarray | None = None) -> torch.Tensor:
        t = self.inner.read(name, start, count, out)
        with self._lock:
            self.bytes[name] += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self.closed += 1
        self.inner.close()


def hub_metadata(sd: dict[str, torch.Tensor], shards: int = 2) -> SafetensorsRepoMetadata:
    """What get_safetensors_metadata returns for sd stored in `shards` files."""
    names = list(sd)
    files: dict[str, SafetensorsFileMetadata] = {}
    weight_map: dict[str, str] = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors: dict[str, HubTensorInfo] = {}
        offset = 0
        for name in names[i * per : (i + 1) * per]:
            t = sd[name]
            size = t.numel() * t.element_size()
            dtype: Any = {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype]
            tensors[name] = HubTensorInfo(dtype=dtype, shape=list(t.shape), data_offsets=(offset, offset + size))
            offset += size
            weight_map[name] = fname
        files[fname] = SafetensorsFileMetadata(metadata={}, tensors=tensors)
    return SafetensorsRepoMetadata(metadata=None, sharded=shards > 1, weight_map=weight_map, files_metadata=files)


def as_two_ranks(run: Any, make: Any) -> list[Any]:
    """Results of ``make()``'s analyses measured as two ranks would: the units dealt out as under torchrun, each
    half measured by its own analyses, the second half's states merged into the first, then finished."""
    from ckptdiff.engine.pipeline import _read_and_measure, _units, plan_reads
    from ckptdiff.runtime.distributed import balance

    ranks = [make(), make()]
    shares = []
    for analyses in ranks:
        units = _units(run, plan_reads(run, analyses))
        owner = balance([u.cost() for u in units], 2)
        shares.append((analyses, [u for u, r in zip(units, owner, strict=True) if r == len(shares)]))
    for _analyses, units in shares:
        _read_and_measure(run, units, False, "")
    first, second = ranks
    for a, b in zip(first, second, strict=True):
        a.merge([b.state()])
    return [a.finish(run) for a in first]
