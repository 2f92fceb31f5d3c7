"""bf16 safetensors checkpoints, model cards and the runs.json ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from examples.tinylm.model import ModelConfig, TinyLM

WEIGHTS = "model.safetensors"
RUN_ORDER = ["base", "sft", "rl_seed1", "rl_seed2", "sft_lr_rl", "rl_lr_sft"]


def save_bf16(model: TinyLM, out_dir: Path, digits: int) -> Path:
    """Store the fp32 master weights the way released models are: bf16, contiguous, HF names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "model_config": json.dumps(model.cfg.to_dict()), "digits": str(digits)}
    path = out_dir / WEIGHTS
    save_file(tensors, str(path), metadata=meta)
    return path


def load_model(ckpt_dir: Path) -> tuple[TinyLM, int]:
    """Rebuild the model from a checkpoint directory; weights are upcast to fp32 masters."""
    path = ckpt_dir / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {ckpt_dir}; run the pretrain stage first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model = TinyLM(ModelConfig(**json.loads(meta["model_config"])))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model, int(meta["digits"])


def record_run(root: Path, entry: dict[str, Any]) -> None:
    """Insert or replace one run (keyed by name) in root/runs.json, in pipeline order."""
    path = root / "runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs = [r for r in runs if r["name"] != entry["name"]] + [entry]
    order = {n: i for i, n in enumerate(RUN_ORDER)}
    runs.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    path.write_text(json.dumps(runs, indent=2) + "\n")


def write_card(out_dir: Path, entry: dict[str, Any]) -> None:
    """A short CARD.md saying how the checkpoint was made."""
    acc_b, acc_a = entry["accuracy_before"], entry["accuracy_after"]
    before = "n/a (random init)" if acc_b is None else f"{acc_b:.3f}"
    lines = [
        f"# {entry['name']}",
        "",
        f"- parent: {entry['parent'] or 'none (trained from scratch)'}",
        f"- method: {entry['method']}",
        f"- learning rate: {entry['lr']:g} (AdamW, fp32 master weights, saved as bf16)",
        f"- optimizer steps: {entry['steps']}",
        f"- seed: {entry['seed']}",
        f"- held-out greedy exact-match accuracy: before {before}, after {acc_a:.3f}"
        f" ({entry['eval_problems']} problems, {entry['digits']}-digit addition)",
        f"- parameters: {entry['params']:,}; wall time {entry['wall_s']:.0f} s"
        f" on {entry['threads']} CPU threads, torch {entry['torch']}",
        "",
        "Hyper-parameters:",
        "",
        "```json",
        json.dumps(entry["hparams"], indent=2),
        "```",
        "",
        "Reproduce (from the repository root):",
        "",
        "```",
        entry["command"],
        "```",
        "",
        "Exact bits can differ across torch versions, CPUs and thread counts.",
        "",
    ]
    (out_dir / "CARD.md").write_text("\n".join(lines))
