"""Sorting tokens by expert, with optional capacity limits.

Legend: T tokens, K experts per token, E experts, N = kept assignments (<= T*K).

Assignments are flattened in token-major order (t*K + k). A stable sort by expert keeps
each expert's rows in token order, so the grouped matmul sees contiguous groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    """Where each kept token-expert assignment goes: source token and flat slot per row (rows grouped by expert), kept
    rows and router assignments per expert, and how many were dropped."""

    token_idx_N: torch.Tensor  # source token of each kept assignment, grouped by expert
    slot_idx_N: torch.Tensor  # flat assignment index (t*K + k) of each kept row
    counts_E: torch.Tensor  # kept rows per expert (int64, on the input's device)
    routed_E: torch.Tensor  # assignments the router made per expert, before dropping
    n_dropped: int


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """ceil(cf * T * K / E): the assignments each expert may take."""
    return int(math.ceil(capacity_factor * n_tokens * top_k / n_experts))


@torch.no_grad()
def dispatch(
    expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor, n_experts: int, capacity_factor: float | None
) -> Dispatch:
    """Group assignments by expert; past capacity, drop the lowest-weight ones.

    Dropped assignments simply vanish from the grouped rows: they contribute zero to the
    MoE output, and the block's residual carries the token.
    """
    T, K = expert_idx_TK.shape
    flat_e = expert_idx_TK.reshape(-1)
    routed_E = torch.bincount(flat_e, minlength=n_experts)
    if capacity_factor is None:
        order = torch.argsort(flat_e, stable=True)
        return Dispatch(order // K, order, routed_E, routed_E, 0)

    cap = expert_capacity(T, K, n_experts, capacity_factor)
    # Highest weight first, then a stable sort by expert: within each expert the rows are
    # ordered by descending weight, so the first `cap` are the ones to keep.
    by_weight = torch.argsort(weights_TK.reshape(-1), descending=True, stable=True)
    order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    rank = torch.arange(order.numel(), device=order.device) - starts_E[flat_e[order]]
    keep = rank < cap
    order = order[keep]
    # Restore token order inside each expert group (deterministic, cache friendly).
    order = order[torch.argsort(flat_e[order] * (T * K) + order)]
    counts_E = routed_E.clamp(max=cap)
    return Dispatch(order // K, order, counts_E, routed_E, int(T * K - order.numel()))
