"""Pretrain a tiny addition LM, then fine-tune it with SFT and with GRPO; save bf16 checkpoints.

Usage (from the repository root):
    python -m examples.tinylm.train all --out examples/checkpoints
    python -m examples.tinylm.train all --out examples/checkpoints/pretrain_seed1 --pretrain-seed 1
    python -m examples.tinylm.train pretrain --out examples/checkpoints/base --seed 0
    python -m examples.tinylm.train sft --base examples/checkpoints/base --out DIR --lr 3e-5 --seed 1
    python -m examples.tinylm.train rl  --base examples/checkpoints/base --out DIR --lr 3e-6 --seed 1

Bit-reproducible on CPU: every stage runs inside :func:`reproducible`, which seeds torch, Python's ``random`` and
NumPy, turns on ``torch.use_deterministic_algorithms`` and runs torch on exactly ``THREADS`` (1) thread; the data
streams are seeded generators, read in order. Two runs of the same command with the same torch build on the same
kind of CPU give byte-identical checkpoints. The SIMD kernels are part of the recipe too: run as a program, this
module pins torch's own kernels to AVX2 (``ATEN_CPU_CAPABILITY=avx2``) and MKL's matrix products to its AVX2
branch (``MKL_CBWR=AVX2``) unless those variables are already set, so that a machine with AVX-512 takes the same
code paths as an AVX2-only one (left to itself, torch picks the widest the CPU has, and other kernels round
differently; on an AVX2 machine, forcing the baseline kernels changed the bits); not verified on an AVX-512
machine. Each stage records the thread count, torch version, the ATen CPU capability it got and MKL_CBWR in its
card and in runs.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Read once, when torch and MKL start: set only while torch is not loaded yet (as under `python -m`). When it was
# (a test, a notebook), they would have no effect, so they are left alone and the record says what was in force.
if "torch" not in sys.modules:
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")

import numpy as np
import torch
import torch.nn.functional as F

from examples.tinylm import ckpt_io, grpo, rollout, task
from examples.tinylm.model import ModelConfig, TinyLM

# One thread: a parallel reduction's summation order depends on the thread count, so a fixed count is part of
# the recipe, and one is the count every machine has. It costs time: `all` took ~7 min here, 3.6 min on two threads.
THREADS = 1
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class PretrainConfig:
    """From-scratch training, loss on the answer tokens.

    The operands are uniform random digits, so a loss on them is irreducible noise: with it, this
    model sat on a plateau for 1200+ steps; without it, it learns in a few hundred.
    """

    digits: int = 3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 384
    steps: int = 300
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 20
    eval_problems: int = 1000


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on correct answers (loss on answer tokens only), constant lr."""

    lr: float = 3e-5
    steps: int = 200
    batch: int = 128
    seed: int = 1
    weight_decay: float = 0.0
    eval_every: int = 100


@dataclass(frozen=True)
class RLConfig:
    """On-policy GRPO with a 0/1 exact-match reward and a k3 KL penalty to the base, constant lr."""

    lr: float = 3e-6
    steps: int = 200
    prompts: int = 16
    group: int = 8
    kl_coef: float = 0.04
    temperature: float = 1.0
    seed: int = 1
    weight_decay: float = 0.0
    eval_every: int = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Seed every RNG, force deterministic kernels and a fixed thread count; restore the global settings after.

    Inside, a stage's result depends only on its arguments (and the torch build and CPU capability), not on
    what ran before it in the process.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def environment() -> dict[str, Any]:
    """What besides the arguments decides the bits: recorded in every card and runs.json entry."""
    return {
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
    }


def _adamw(model: TinyLM, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def _step(model: TinyLM, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _answer_loss(model: TinyLM, seqs: torch.Tensor, digits: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given everything before them."""
    p = task.prompt_len(digits)
    logits = model(seqs[:, :-1])[:, p - 1 :]  # (batch, digits + 1, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, p:].reshape(-1))


def _finish(
    model: TinyLM, out: Path, digits: int, entry: dict[str, Any], heldout: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    """Save bf16, score the saved (rounded) weights, write the card and the runs.json entry."""
    ckpt_io.save_bf16(model, out, digits)
    saved, _ = ckpt_io.load_model(out)
    entry["accuracy_after"] = round(rollout.greedy_accuracy(saved, *heldout, digits), 4)
    entry["wall_s"] = round(entry["wall_s"], 1)
    entry["params"] = sum(p.numel() for p in model.parameters())
    entry["digits"] = digits
    entry["eval_problems"] = int(heldout[0].shape[0])
    entry.update(environment())
    entry["sha256"] = ckpt_io.sha256(out / ckpt_io.WEIGHTS)
    ckpt_io.write_card(out, entry)
    ckpt_io.record_run(out.parent, entry)
    log(
        f"[{entry['name']}] saved {out}; accuracy {entry['accuracy_before']} -> "
        f"{entry['accuracy_after']:.3f} in {entry['wall_s']:.0f} s"
    )
    return entry


def pretrain(cfg: PretrainConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Train from scratch with AdamW (linear warmup, then constant lr) and save the base.

    It stops on purpose part-way up the learning curve, so that fine-tuning has room to improve. ``cfg.seed`` (the
    pretraining seed) decides the initial weights and the problem stream.
    """
    with reproducible(cfg.seed):
        return _pretrain(cfg, out, command)


def _pretrain(cfg: PretrainConfig, out: Path, command: str) -> dict[str, Any]:
    t0 = time.time()
    mcfg = ModelConfig(
        vocab_size=len(task.VOCAB),
        max_positions=task.seq_len(cfg.digits) - 1,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
    )
    model = TinyLM(mcfg)
    heldout = task.heldout_set(cfg.digits, cfg.eval_problems)
    stream = task.ProblemStream(cfg.digits, cfg.seed, heldout)
    opt = _adamw(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    for step in range(1, cfg.steps + 1):
        loss = _answer_loss(model, task.encode(*stream.sample(cfg.batch), cfg.digits), cfg.digits)
        _step(model, opt, loss)
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = rollout.greedy_accuracy(model, *heldout, cfg.digits)
            log(f"[base] step {step} loss {loss.item():.4f} acc {acc:.3f} ({time.time() - t0:.0f} s)")
    entry = {
        "name": out.name,
        "parent": None,
        "method": "pretrain",
        "lr": cfg.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "accuracy_before": None,
        "hparams": asdict(cfg),
        "command": command,
    }
    entry["wall_s"] = time.time() - t0
    return _finish(model, out, cfg.digits, entry, heldout)


def sft(base: Path, cfg: SFTConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Fine-tune the base on correct answers; cross-entropy on the answer tokens only."""
    with reproducible(cfg.seed):
        return _sft(base, cfg, out, command)


def _sft(base: Path, cfg: SFTConfig, out: Path, command: str) -> dict[str, Any]:
    t0 = time.time()
    model, digits = ckpt_io.load_model(base)
    heldout = task.heldout_set(digits)
    acc_before = round(rollout.greedy_accuracy(model, *heldout, digits), 4)
    stream = task.ProblemStream(digits, 1000 + cfg.seed, heldout)
    opt = _adamw(model, cfg.lr, cfg.weight_decay)
    for step in range(1, cfg.steps + 1):
        loss = _answer_loss(model, task.encode(*stream.sample(cfg.batch), digits), digits)
        _step(model, opt, loss)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = rollout.greedy_accuracy(model, *heldout, digits)
            log(f"[{out.name}] step {step} loss {loss.item():.4f} acc {acc:.3f} ({time.time() - t0:.0f} s)")
    entry = {
        "name": out.name,
        "parent": base.name,
        "method": "sft",
        "lr": cfg.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "accuracy_before": acc_before,
        "hparams": asdict(cfg),
        "command": command,
    }
    entry["wall_s"] = time.time() - t0
    return _finish(model, out, digits, entry, heldout)


def rl_step(
    policy: TinyLM,
    ref: TinyLM,
    opt: torch.optim.Optimizer,
    stream: task.ProblemStream,
    cfg: RLConfig,
    digits: int,
    gen: torch.Generator,
    reward_fn: RewardFn = rollout.exact_match,
) -> dict[str, float]:
    """One on-policy GRPO update: sample G answers per prompt, score, normalize in-group, step."""
    if cfg.group < 2:
        raise ValueError(f"GRPO needs group >= 2 samples per prompt, got {cfg.group}")
    a, b = stream.sample(cfg.prompts)
    a, b = a.repeat_interleave(cfg.group), b.repeat_interleave(cfg.group)  # (prompts * G,)
    prompts = task.encode(a, b, digits)[:, : task.prompt_len(digits)]
    seqs = rollout.generate(policy, prompts, digits + 1, cfg.temperature, gen)  # (n, seq_len)
    rewards = reward_fn(seqs, a, b, digits)  # (n,)
    adv = grpo.group_advantages(rewards.view(cfg.prompts, cfg.group)).reshape(-1)  # (n,)
    with torch.no_grad():
        ref_logp = rollout.answer_logprobs(ref, seqs, digits)
    logp = rollout.answer_logprobs(policy, seqs, digits)  # (n, digits + 1)
    loss, kl = grpo.grpo_loss(logp, ref_logp, adv, cfg.kl_coef)
    _step(policy, opt, loss)
    return {
        "loss": loss.item(),
        "reward": rewards.mean().item(),
        "kl": kl.item(),
        "reward_std": rewards.view(cfg.prompts, cfg.group).std(dim=1).mean().item(),
    }


def rl(
    base: Path,
    cfg: RLConfig,
    out: Path,
    command: str = "",
    reward_fn: RewardFn = rollout.exact_match,
    save_steps: tuple[int, ...] = (),
    lr_decay: str = "constant",
) -> dict[str, Any]:
    """GRPO from the base, with the base (frozen) as KL reference.

    ``save_steps``: also save the policy after each of these optimizer steps (0: before the first) as
    ``OUT/steps/step_NNN/model.safetensors``, for ``ckptdiff trajectory``. Saving reads the weights only: the run and
    its final checkpoint are the same bytes with or without it. ``lr_decay="linear"`` decays the learning rate
    linearly to 0 over the run (the shipped runs keep it constant; no scheduler is made then).
    """
    with reproducible(cfg.seed):
        return _rl(base, cfg, out, command, reward_fn, save_steps, lr_decay)


def save_step(model: TinyLM, out: Path, step: int, digits: int) -> Path:
    """An intermediate checkpoint of a run, where ``ckptdiff trajectory OUT/steps`` finds it (step-numbered)."""
    return ckpt_io.save_bf16(model, out / "steps" / f"step_{step:03d}", digits)


def _rl(
    base: Path,
    cfg: RLConfig,
    out: Path,
    command: str,
    reward_fn: RewardFn,
    save_steps: tuple[int, ...] = (),
    lr_decay: str = "constant",
) -> dict[str, Any]:
    t0 = time.time()
    policy, digits = ckpt_io.load_model(base)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    heldout = task.heldout_set(digits)
    acc_before = round(rollout.greedy_accuracy(policy, *heldout, digits), 4)
    stream = task.ProblemStream(digits, 2000 + cfg.seed, heldout)
    gen = torch.Generator().manual_seed(3000 + cfg.seed)
    opt = _adamw(policy, cfg.lr, cfg.weight_decay)
    sched = None
    if lr_decay == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    elif lr_decay != "constant":
        raise ValueError(f"lr_decay must be constant or linear, got {lr_decay!r}")
    if 0 in save_steps:
        save_step(policy, out, 0, digits)
    for step in range(1, cfg.steps + 1):
        stats = rl_step(policy, ref, opt, stream, cfg, digits, gen, reward_fn)
        if sched is not None:
            sched.step()
        if step in save_steps:
            save_step(policy, out, step, digits)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = rollout.greedy_accuracy(policy, *heldout, digits)
            log(
                f"[{out.name}] step {step} reward {stats['reward']:.3f} kl {stats['kl']:.2e} "
                f"acc {acc:.3f} ({time.time() - t0:.0f} s)"
            )
    entry = {
        "name": out.name,
        "parent": base.name,
        "method": "rl_grpo",
        "lr": cfg.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "accuracy_before": acc_before,
        "hparams": asdict(cfg),
        "command": command,
    }
    if lr_decay != "constant":  # recorded only when used: the shipped runs' records stay as they were
        entry["lr_decay"] = lr_decay
    entry["wall_s"] = time.time() - t0
    return _finish(policy, out, digits, entry, heldout)


def _cmd(*parts: object) -> str:
    return "python -m examples.tinylm.train " + " ".join(str(p) for p in parts)


def run_all(
    out: Path, pre: PretrainConfig, sft_cfg: SFTConfig, rl_cfg: RLConfig, save_steps: tuple[int, ...] = ()
) -> list[dict[str, Any]]:
    """The whole experiment: base, sft, rl_seed1, rl_seed2 and the two learning-rate controls; ``save_steps``:
    intermediate checkpoints of rl_seed1 (see :func:`rl`)."""
    base = out / "base"
    results = [pretrain(pre, base, _cmd("pretrain", "--out", base, "--steps", pre.steps, "--seed", pre.seed))]
    stages: list[tuple[str, str, SFTConfig | RLConfig]] = [
        ("sft", "sft", sft_cfg),
        ("rl_seed1", "rl", replace(rl_cfg, seed=1)),
        ("rl_seed2", "rl", replace(rl_cfg, seed=2)),
        ("sft_lr_rl", "sft", replace(sft_cfg, lr=rl_cfg.lr)),
        ("rl_lr_sft", "rl", replace(rl_cfg, lr=sft_cfg.lr)),
    ]
    for name, method, cfg in stages:
        cmd = _cmd(
            method, "--base", base, "--out", out / name, "--lr", cfg.lr, "--steps", cfg.steps, "--seed", cfg.seed
        )
        if method == "sft":
            results.append(sft(base, cfg, out / name, cmd))  # type: ignore[arg-type]
        else:
            saves = save_steps if name == "rl_seed1" else ()
            results.append(rl(base, cfg, out / name, cmd, save_steps=saves))  # type: ignore[arg-type]
    return results


def _steps(text: str) -> tuple[int, ...]:
    """--save-steps: comma-separated step numbers."""
    return tuple(sorted({int(t) for t in text.split(",") if t.strip()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.tinylm.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    p_all = sub.add_parser("all", help="run every stage into OUT/<name>")
    p_all.add_argument("--out", type=Path, required=True)
    p_all.add_argument(
        "--pretrain-seed", type=int, default=PretrainConfig.seed, help="seed of the base's init and data stream"
    )
    p_all.add_argument("--save-steps", type=_steps, default=(), help="rl_seed1's intermediate checkpoints: 0,1,100")
    p_pre = sub.add_parser("pretrain", help="train the base from scratch")
    p_pre.add_argument("--out", type=Path, required=True)
    p_pre.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p_pre.add_argument("--seed", type=int, default=PretrainConfig.seed)
    for name, cls in (("sft", SFTConfig), ("rl", RLConfig)):
        p = sub.add_parser(name, help=f"fine-tune the base with {name.upper()}")
        p.add_argument("--base", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--lr", type=float, default=cls.lr)
        p.add_argument("--steps", type=int, default=cls.steps)
        p.add_argument("--seed", type=int, default=cls.seed)
        if name == "rl":
            p.add_argument("--save-steps", type=_steps, default=(), help="also save after these steps: 0,1,100")
            p.add_argument("--lr-decay", choices=("constant", "linear"), default="constant")
    args = parser.parse_args(argv)
    cmd = _cmd(*(argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    if args.stage == "all":
        run_all(args.out, PretrainConfig(seed=args.pretrain_seed), SFTConfig(), RLConfig(), args.save_steps)
    elif args.stage == "pretrain":
        pretrain(PretrainConfig(steps=args.steps, seed=args.seed), args.out, cmd)
    elif args.stage == "sft":
        sft(args.base, SFTConfig(lr=args.lr, steps=args.steps, seed=args.seed), args.out, cmd)
    else:
        cfg = RLConfig(lr=args.lr, steps=args.steps, seed=args.seed)
        rl(args.base, cfg, args.out, cmd, save_steps=args.save_steps, lr_decay=args.lr_decay)
    log(f"{args.stage} done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
