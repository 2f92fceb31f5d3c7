"""A LoRA fine-tune of the shipped base, saved as a PEFT adapter folder (written here, not by peft).

The SFT recipe of :mod:`examples.tinylm.train` (correct answers, loss on the answer tokens, the same problem
stream), with the base frozen and every linear layer of the blocks (q/k/v/o, gate/up/down) given a rank-r
update: ``y = W x + (alpha / r) B A x``, A (r × in) drawn as PEFT draws it (Kaiming-uniform, a = √5), B (out × r)
zero, so the model starts exactly at the base. Only A and B train, in fp32.

The result is written in PEFT's layout, so that ``ckptdiff spectral examples/checkpoints/base
examples/checkpoints/lora_sft`` reads it as the checkpoint its merge would give:

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight``
  (out × r), fp32;
- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``,
  ``base_model_name_or_path`` and the options PEFT writes (all at their plain-LoRA values);
- ``CARD.md``: how it was made, the held-out accuracy of the merged model (rounded to the base's bf16, as
  ckptdiff reads it), the sha256 of the weights.

    python -m examples.tinylm.lora --base examples/checkpoints/base --out examples/checkpoints/lora_sft
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if "torch" not in sys.modules:  # the kernel pins of examples.tinylm.train, set before torch loads (see there)
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")

import torch
from safetensors.torch import save_file
from torch import nn

from examples.tinylm import ckpt_io, rollout, task, train
from examples.tinylm.model import TinyLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA SFT: the SFT stream and loss, a higher constant lr (LoRA's usual), rank r on every block linear."""

    r: int = 8
    alpha: int = 16
    lr: float = 1e-3
    steps: int = 200
    batch: int = 128
    seed: int = 1
    eval_every: int = 100


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update (alpha / r) B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: int) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


def attach(model: TinyLM, r: int, alpha: int) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap each target linear layer; the wrapped modules by their path in the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, r, alpha)
                setattr(module, name, lora)
                wrapped[f"{path}.{name}"] = lora
    return wrapped


def merged_state(model: TinyLM, wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The merged model's weights, W + (alpha / r) B A in fp32, under the base's names."""
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base.weight", ".weight")] = t.detach().clone()
    for path, lora in wrapped.items():
        state[f"{path}.weight"] = (lora.base.weight + lora.scaling * (lora.lora_B @ lora.lora_A)).detach()
    return state


def save_adapter(wrapped: dict[str, LoRALinear], cfg: LoRAConfig, base: Path, out: Path) -> Path:
    """Write the adapter in PEFT's layout: factors under ``base_model.model.<module>``, and its config."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, lora in wrapped.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora.lora_A.detach().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora.lora_B.detach().contiguous()
    path = out / ADAPTER_WEIGHTS
    save_file(tensors, str(path), metadata={"format": "pt"})
    ckpt_io._canonical_header(path)  # equal factors, equal bytes
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def lora_sft(base: Path, cfg: LoRAConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Train the adapter on the SFT stream; save it; return its card entry."""
    with train.reproducible(cfg.seed):
        return _lora_sft(base, cfg, out, command)


def _lora_sft(base: Path, cfg: LoRAConfig, out: Path, command: str) -> dict[str, Any]:
    t0 = time.time()
    model, digits = ckpt_io.load_model(base)
    heldout = task.heldout_set(digits)
    acc_before = round(rollout.greedy_accuracy(model, *heldout, digits), 4)
    wrapped = attach(model, cfg.r, cfg.alpha)
    params = [p for lora in wrapped.values() for p in (lora.lora_A, lora.lora_B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    stream = task.ProblemStream(digits, 1000 + cfg.seed, heldout)  # the SFT run's stream
    for step in range(1, cfg.steps + 1):
        loss = train._answer_loss(model, task.encode(*stream.sample(cfg.batch), digits), digits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = rollout.greedy_accuracy(model, *heldout, digits)
            train.log(f"[{out.name}] step {step} loss {loss.item():.4f} acc {acc:.3f} ({time.time() - t0:.0f} s)")
    weights = save_adapter(wrapped, cfg, base, out)
    merged, _ = ckpt_io.load_model(base)  # the merged weights rounded to the base's bf16, as ckptdiff reads them
    merged.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in merged_state(model, wrapped).items()})
    entry: dict[str, Any] = {
        "name": out.name,
        "parent": base.name,
        "method": f"lora sft (r={cfg.r}, alpha={cfg.alpha}, {len(wrapped)} modules; only A and B train)",
        "lr": cfg.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "accuracy_before": acc_before,
        "accuracy_after": round(rollout.greedy_accuracy(merged, *heldout, digits), 4),
        "hparams": asdict(cfg),
        "command": command,
        "wall_s": round(time.time() - t0, 1),
        "params": sum(p.numel() for p in params),
        "digits": digits,
        "eval_problems": int(heldout[0].shape[0]),
        **train.environment(),
        "sha256": ckpt_io.sha256(weights),
    }
    ckpt_io.write_card(out, entry)
    card = out / "CARD.md"  # the card names model.safetensors and bf16 for full checkpoints: say what this is
    card.write_text(
        card.read_text()
        .replace(f"sha256 of {ckpt_io.WEIGHTS}", f"sha256 of {ADAPTER_WEIGHTS}")
        .replace("fp32 master weights, saved as bf16", "fp32 factors, saved as fp32; the base frozen")
        .replace("- parameters:", "- trained parameters (A and B):")
    )
    train.log(f"[{out.name}] saved {out}; merged accuracy {acc_before} -> {entry['accuracy_after']:.3f}")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, default=Path("examples/checkpoints/base"))
    parser.add_argument("--out", type=Path, default=Path("examples/checkpoints/lora_sft"))
    parser.add_argument("--steps", type=int, default=LoRAConfig.steps)
    parser.add_argument("--r", type=int, default=LoRAConfig.r)
    args = parser.parse_args(argv)
    cfg = LoRAConfig(steps=args.steps, r=args.r, alpha=2 * args.r)
    command = f"python -m examples.tinylm.lora --base {args.base} --out {args.out} --steps {cfg.steps} --r {cfg.r}"
    lora_sft(args.base, cfg, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
