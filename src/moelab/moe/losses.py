"""Router losses and statistics as pure functions (no module state).

Legend: T tokens (valid ones only; padding is removed before these are called),
E experts, K experts chosen per token.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    *, probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, n_experts: int, counts_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss, E * sum_e f_e * P_e.

    f_e is the fraction of the routing assignments that chose expert e (sums to 1) and
    P_e the mean router probability of expert e over these T tokens. By default f counts
    these tokens' T*K assignments; `counts_E` replaces those counts (global balancing:
    counts summed over data-parallel ranks and micro-batches). A perfectly uniform router
    gives 1.0 for any K. Hugging Face's `load_balancing_loss_func` counts f_e per token
    instead of per assignment, so its value is K times this one.

    Gradient flows through P only; f is a count.
    """
    T, K = expert_idx_TK.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    if counts_E is None:
        counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=n_experts)
    counts_E = counts_E.to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = probs_TE.mean(dim=0)
    return n_experts * torch.dot(f_E, P_E)


def router_z_loss(*, logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@torch.no_grad()
def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing distribution; log(E) is uniform."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()


@torch.no_grad()
def max_violation(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """max load / mean load - 1: 0 when perfectly balanced, E-1 when one expert takes all."""
    load = tokens_per_expert_E.float()
    mean = load.mean()
    if mean <= 0:
        return load.new_zeros(())
    return load.max() / mean - 1.0
