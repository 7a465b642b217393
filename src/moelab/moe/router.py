"""Token-choice top-k router.

Legend: T tokens, D model dim, E experts, K experts chosen per token.

The router always runs in fp32, whatever the autocast dtype: softmax over bf16 logits
flips top-k choices between nearly tied experts and lets logits drift (ST-MoE, sec. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig


@dataclass
class Routing:
    """A router's decision for T tokens: fp32 logits and probabilities (T, E), combine weights (T, K) and chosen experts
    (T, K)."""

    logits_TE: torch.Tensor  # fp32 router logits
    probs_TE: torch.Tensor  # fp32 per-token distribution over experts (for losses, entropy)
    weights_TK: torch.Tensor  # fp32 combine weights of the chosen experts
    expert_idx_TK: torch.Tensor  # int64 chosen experts


def balanced_assignment(n_tokens: int, top_k: int, n_experts: int, device=None) -> torch.Tensor:
    """(T, K) experts with perfectly even load: assignment t*K + j goes to expert
    (t*K + j) mod E, so each token's K experts are distinct (K <= E) and every expert
    gets floor or ceil of T*K/E rows - what frameworks force when they time routing as if
    it were balanced."""
    flat = torch.arange(n_tokens * top_k, device=device) % n_experts
    return flat.view(n_tokens, top_k)


class Router(nn.Module):
    """`weight` (E, D) is the learned gate; the buffer `bias` (E,) exists only with
    aux-loss-free balancing and shifts expert *choice*, never the combine weights."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        if cfg.bias_update_rate > 0:
            self.register_buffer("bias", torch.zeros(cfg.n_experts))
        else:
            self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, cfg.init_std_router); the balancing bias, if any, to zero."""
        nn.init.normal_(self.weight, std=self.cfg.init_std_router)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route x_TD (T, D): fp32 logits, softmax or sigmoid scores, top-k choice (shifted by the balancing bias, if
        any), combine weights (renormalised if configured). Jitter multiplies the input in training only."""
        cfg = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):
            x32_TD = x_TD.float()
            if self.training and cfg.jitter > 0:
                noise = torch.empty_like(x32_TD).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
                x32_TD = x32_TD * noise
            logits_TE = F.linear(x32_TD, self.weight.float())
            if cfg.router == "softmax":
                scores_TE = logits_TE.softmax(dim=-1)
                probs_TE = scores_TE
            else:
                scores_TE = logits_TE.sigmoid()
                probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if cfg.router_override == "balanced":
                expert_idx_TK = balanced_assignment(x_TD.shape[0], cfg.top_k, cfg.n_experts, x_TD.device)
            else:
                choice_TE = scores_TE if self.bias is None else scores_TE + self.bias
                _, expert_idx_TK = torch.topk(choice_TE.detach(), cfg.top_k, dim=-1)
            weights_TK = scores_TE.gather(-1, expert_idx_TK)
            if cfg.renormalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing(logits_TE, probs_TE, weights_TK, expert_idx_TK)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): push under-loaded experts up.

        Call after each optimizer step with the loads summed over that step's
        micro-batches (and, with data parallelism, over ranks, so every replica of the
        router moves the same way); bias += rate * sign(mean_load - load), then recentred
        to zero mean: top-k choice ignores a common shift, and without recentring the
        biases drift together without bound (the sign terms need not sum to zero).
        A router nothing trains (fine-tuning with the router frozen, or LoRA that leaves it
        out) keeps its bias too: the bias is part of the routing that freezing keeps.
        """
        if self.bias is None or not any(p.requires_grad for p in self.parameters()):
            return
        load = tokens_per_expert_E.to(self.bias.device, torch.float32)
        self.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.bias -= self.bias.mean()
