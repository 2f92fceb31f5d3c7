"""Sampling, greedy evaluation and per-token log-probs of answers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from examples.tinylm import task
from examples.tinylm.model import TinyLM


@torch.no_grad()
def generate(
    model: TinyLM,
    prompts: torch.Tensor,
    n_new: int,
    temperature: float,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend prompts (n, p) by n_new tokens; temperature 0 means greedy. Returns (n, p + n_new)."""
    seqs = prompts
    for _ in range(n_new):
        logits = model(seqs)[:, -1, :].float()  # (n, vocab)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)  # (n, 1)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)  # (n, 1)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


def answer_logprobs(model: TinyLM, seqs: torch.Tensor, digits: int) -> torch.Tensor:
    """Log-probability of each answer token under the model: (n, digits + 1)."""
    logits = model(seqs[:, :-1])  # (n, t - 1, vocab)
    logp = F.log_softmax(logits.float(), dim=-1)
    tok_logp = logp.gather(-1, seqs[:, 1:, None]).squeeze(-1)  # (n, t - 1)
    return tok_logp[:, task.prompt_len(digits) - 1 :]


def exact_match(seqs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, digits: int) -> torch.Tensor:
    """1.0 where the whole answer is right, else 0.0: the verifiable reward. Shape (n,)."""
    answer = seqs[:, task.prompt_len(digits) :]
    return (answer == task.answer_tokens(a, b, digits)).all(dim=1).float()


@torch.no_grad()
def greedy_accuracy(model: TinyLM, a: torch.Tensor, b: torch.Tensor, digits: int) -> float:
    """Exact-match accuracy of greedy decoding on the given problems."""
    was_training = model.training
    model.eval()
    prompts = task.encode(a, b, digits)[:, : task.prompt_len(digits)]
    seqs = generate(model, prompts, digits + 1, temperature=0.0)
    model.train(was_training)
    return float(exact_match(seqs, a, b, digits).mean())
