"""bf16 safetensors checkpoints, model cards and the runs.json ledger."""

from __future__ import annotations

import hashlib
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
    _canonical_header(path)
    return path


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors header in a fixed order, so that equal weights give equal bytes.

    safetensors 0.8 writes ``__metadata__`` in hash-map order, which changes from process to process: the
    same weights saved twice could differ in their header bytes. Here the metadata keys are sorted and the tensor
    entries follow their data offsets; the data section is kept byte for byte.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    canon: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    canon.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes: two runs reproduce a checkpoint exactly when these agree."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        f" on {entry['threads']} CPU thread{'s' if entry['threads'] != 1 else ''}, torch {entry['torch']},"
        f" ATen CPU capability {entry['cpu_capability']}, MKL_CBWR {entry['mkl_cbwr']},"
        f" deterministic algorithms {'on' if entry['deterministic_algorithms'] else 'off'}",
        f"- sha256 of {WEIGHTS}: `{entry['sha256']}`",
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
        "The command reproduces these bytes (the sha256 above) with the same torch build on a CPU of the same"
        " capability; another torch version or CPU capability can change the bits.",
        "",
    ]
    (out_dir / "CARD.md").write_text("\n".join(lines))
