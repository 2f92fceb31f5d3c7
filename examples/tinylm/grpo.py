"""GRPO-style objective: group-normalized advantages and a k3 KL penalty to a reference model."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(prompts, G) rewards -> (r - group mean) / (group std + eps), std unbiased as in TRL."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref) on policy samples: exp(d) - d - 1, d = ref - pol."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy GRPO loss over answer tokens (n, T) with advantages (n,); returns (loss, mean KL).

    With one optimizer step per batch the importance ratio is 1, so the clipped surrogate reduces to
    -A * log p (same gradient); the loss is averaged over tokens, then samples.
    """
    kl = k3_kl(logp, ref_logp)
    per_token = -adv[:, None] * logp + kl_coef * kl
    return per_token.mean(), kl.mean().detach()
