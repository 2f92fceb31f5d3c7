"""The tinylm example pipeline: tiny runs into tmp_path, checked for format and known-by-construction behaviour."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not part of the installed ckptdiff package
    sys.path.insert(0, str(ROOT))

from examples.tinylm import ckpt_io, grpo, rollout, task, train  # noqa: E402
from examples.tinylm.model import ModelConfig, TinyLM, expected_tensor_names  # noqa: E402

TINY_PRE = train.PretrainConfig(
    digits=2, d_model=16, n_layers=2, n_heads=2, d_mlp=32, steps=2, batch=16, warmup=1, eval_every=1, eval_problems=64
)
TINY_SFT = train.SFTConfig(lr=1e-3, steps=2, batch=8, eval_every=1)
TINY_RL = train.RLConfig(lr=1e-3, steps=2, prompts=2, group=4, eval_every=1)


def first_digit_even(seqs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, digits: int) -> torch.Tensor:
    """A reward a random model earns about half the time, so groups are not all-equal."""
    return (seqs[:, task.prompt_len(digits)] % 2 == 0).float()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpts")
    train.run_all(out, TINY_PRE, TINY_SFT, TINY_RL)
    return out


def test_encoding_reverses_answer() -> None:
    seqs = task.encode(torch.tensor([123]), torch.tensor([456]), 3)
    assert task.decode(seqs) == ["^123+456=9750"]
    assert seqs.shape[1] == task.seq_len(3)


def test_pipeline_saves_bf16_with_hf_names(pipeline: Path) -> None:
    base_model, digits = ckpt_io.load_model(pipeline / "base")
    expected = set(expected_tensor_names(base_model.cfg))
    assert len(expected) == 2 + 9 * TINY_PRE.n_layers + 2
    for name in ckpt_io.RUN_ORDER:
        path = pipeline / name / ckpt_io.WEIGHTS
        tensors = load_file(str(path))
        assert set(tensors) == expected, name
        assert all(t.dtype == torch.bfloat16 for t in tensors.values()), name
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["digits"] == str(digits)
        assert (pipeline / name / "CARD.md").read_text().startswith(f"# {name}")
    shapes = load_file(str(pipeline / "base" / ckpt_io.WEIGHTS))
    assert shapes["model.layers.1.mlp.down_proj.weight"].shape == (16, 32)
    assert shapes["model.embed_positions.weight"].shape == (task.seq_len(2) - 1, 16)


def test_runs_json_records_every_run(pipeline: Path) -> None:
    runs = json.loads((pipeline / "runs.json").read_text())
    assert [r["name"] for r in runs] == ckpt_io.RUN_ORDER
    by_name = {r["name"]: r for r in runs}
    assert by_name["sft_lr_rl"]["lr"] == TINY_RL.lr and by_name["sft_lr_rl"]["method"] == "sft"
    assert by_name["rl_lr_sft"]["lr"] == TINY_SFT.lr and by_name["rl_lr_sft"]["method"] == "rl_grpo"
    assert (by_name["rl_seed1"]["seed"], by_name["rl_seed2"]["seed"]) == (1, 2)
    for r in runs:
        assert {"parent", "steps", "accuracy_before", "accuracy_after"} <= set(r)
        assert 0.0 <= r["accuracy_after"] <= 1.0
        assert r["parent"] == (None if r["name"] == "base" else "base")


def test_training_is_bit_reproducible(pipeline: Path, tmp_path: Path) -> None:
    """The whole pipeline trained again in this process gives byte-identical checkpoints.

    Between the two runs every global the trainer depends on is disturbed (thread count, deterministic mode, the
    torch, random and NumPy RNGs): the trainer must set each itself. A different pretraining seed changes the bytes,
    so the comparison has teeth.
    """
    first = {n: ckpt_io.sha256(pipeline / n / ckpt_io.WEIGHTS) for n in ckpt_io.RUN_ORDER}
    runs = {r["name"]: r for r in json.loads((pipeline / "runs.json").read_text())}
    assert {n: runs[n]["sha256"] for n in ckpt_io.RUN_ORDER} == first  # the ledger records the file's bytes
    for r in runs.values():
        assert r["threads"] == train.THREADS and r["deterministic_algorithms"] is True
        assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(12345)
    torch.rand(17)
    random.seed(9)
    np.random.seed(9)
    try:
        train.run_all(tmp_path / "again", TINY_PRE, TINY_SFT, TINY_RL)
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()  # restored
    finally:
        torch.set_num_threads(threads)
    second = {n: ckpt_io.sha256(tmp_path / "again" / n / ckpt_io.WEIGHTS) for n in ckpt_io.RUN_ORDER}
    assert second == first
    other = train.pretrain(replace(TINY_PRE, seed=1), tmp_path / "seed1" / "base")
    assert other["sha256"] != first["base"]


def test_saved_header_is_canonical(tmp_path: Path) -> None:
    """safetensors writes its metadata in hash-map order; save_bf16 rewrites it sorted, data untouched."""
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(vocab_size=13, max_positions=6, d_model=8, n_layers=1, n_heads=2, d_mlp=16))
    digests = {ckpt_io.sha256(ckpt_io.save_bf16(model, tmp_path / str(i), digits=2)) for i in range(4)}
    assert len(digests) == 1
    path = tmp_path / "0" / ckpt_io.WEIGHTS
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert (8 + n) % 8 == 0
    loaded, digits = ckpt_io.load_model(tmp_path / "0")
    assert digits == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key


def _changed_entries(a: Path, b: Path) -> int:
    wa, wb = load_file(str(a / ckpt_io.WEIGHTS)), load_file(str(b / ckpt_io.WEIGHTS))
    return sum(int((wa[k].view(torch.int16) != wb[k].view(torch.int16)).sum()) for k in wa)


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_rl_changes_weights_only_with_nonzero_lr(pipeline: Path, tmp_path: Path, lr: float) -> None:
    cfg = train.RLConfig(lr=lr, steps=2, prompts=4, group=8, kl_coef=0.04, eval_every=1)
    train.rl(pipeline / "base", cfg, tmp_path / "rl", reward_fn=first_digit_even)
    changed = _changed_entries(pipeline / "base", tmp_path / "rl")
    if lr == 0.0:
        assert changed == 0
    else:
        assert changed > 0


def test_rl_step_has_reward_signal(pipeline: Path) -> None:
    policy, digits = ckpt_io.load_model(pipeline / "base")
    ref, _ = ckpt_io.load_model(pipeline / "base")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    stream = task.ProblemStream(digits, 0, task.heldout_set(digits, 64))
    cfg = train.RLConfig(prompts=4, group=8)
    stats = train.rl_step(policy, ref, opt, stream, cfg, digits, torch.Generator().manual_seed(0), first_digit_even)
    assert stats["reward_std"] > 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    moved = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in moved


def test_group_advantages_match_formula() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = (4 * 0.25 / 3) ** 0.5  # unbiased std of two ones and two zeros
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]) / (torch.tensor([[std], [0.0]]) + 1e-4)
    torch.testing.assert_close(grpo.group_advantages(rewards), expected, rtol=1e-6, atol=1e-6)


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere() -> None:
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    torch.testing.assert_close(grpo.k3_kl(logp, logp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.25, 0.4, 0.5]))
    d = ref - logp
    torch.testing.assert_close(grpo.k3_kl(logp, ref), d.exp() - d - 1)
    assert bool((grpo.k3_kl(logp, ref) > 0).all())


def test_exact_match_reward() -> None:
    a, b = torch.tensor([12, 99]), torch.tensor([34, 1])
    seqs = task.encode(a, b, 2)
    torch.testing.assert_close(rollout.exact_match(seqs, a, b, 2), torch.tensor([1.0, 1.0]))
    seqs[1, -1] = (seqs[1, -1] + 1) % 10
    torch.testing.assert_close(rollout.exact_match(seqs, a, b, 2), torch.tensor([1.0, 0.0]))
