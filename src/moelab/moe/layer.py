"""The MoE layer: router -> dispatch -> grouped experts -> combine (+ shared experts).

Legend: T tokens (valid ones), D model dim, E experts, K experts per token,
N kept assignments grouped by expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import MoEConfig
from ..ffn import SwiGLU
from ..phases import phase
from .dispatch import dispatch
from .experts import Backend, GroupedExperts
from .losses import load_balancing_loss, max_violation, router_entropy, router_z_loss
from .router import Router


@dataclass
class MoEStats:
    """What one MoE forward reports. Losses are in the graph; the rest is detached.

    tokens_per_expert counts the router's assignments (before capacity dropping);
    dropped_fraction is the share of those assignments that capacity dropped.
    """

    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor  # lb_coef * lb_loss + z_coef * z_loss
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor
    max_violation: torch.Tensor

    # the scalar fields, in the order `pack` lays them out before the E expert loads
    SCALARS = ("lb_loss", "z_loss", "aux_loss", "dropped_fraction", "router_entropy", "max_violation")

    def pack(self) -> torch.Tensor:
        """(6 + E,) float64, detached: the scalars in SCALARS order, then tokens_per_expert - one row to reduce over
        ranks."""
        scalars = torch.stack([getattr(self, f).detach().double().reshape(()) for f in self.SCALARS])
        return torch.cat([scalars, self.tokens_per_expert.detach().double()])

    @classmethod
    def unpack(cls, row: torch.Tensor) -> MoEStats:
        """The MoEStats `pack` made `row` from (fp32 scalars, int64 loads)."""
        n = len(cls.SCALARS)
        scalars = {f: row[i].float() for i, f in enumerate(cls.SCALARS)}
        return cls(**scalars, tokens_per_expert=row[n:].to(torch.long))


class SharedExperts(SwiGLU):
    """S always-on experts fused into one SwiGLU of hidden S*F_s, optionally scaled by
    sigmoid(gate(x)) per token as in Qwen2-MoE."""

    def __init__(self, d_model: int, hidden: int, gated: bool):
        super().__init__(d_model, hidden)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shared SwiGLU of x (..., D), scaled by sigmoid(gate(x)) per token when gated."""
        y = super().forward(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y


class MoE(nn.Module):
    """Token-choice top-k mixture of SwiGLU experts.

    `y, stats = moe(x, mask)`: x (..., D) -> y (..., D). `mask` (x.shape[:-1], bool,
    True = real token) keeps padded tokens out of routing, losses and statistics; their
    output is zero.

    With `cfg.balance_scope == "global"` the load-balancing loss counts expert
    frequencies over the optimizer step's micro-batches so far, which `start_micro_batch`
    delimits, and over whatever `count_reducer` adds up: None = this process; under data
    parallelism `moelab.parallel` installs a sum over the data-parallel ranks. The layer
    itself stays single-device.
    """

    # (E,) counts of this micro-batch -> the same counts summed over the data-parallel ranks
    count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, cfg: MoEConfig, backend: Backend = "auto"):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, backend, cfg.expert_dropout)
        self.shared = (
            SharedExperts(cfg.d_model, cfg.d_shared_total, cfg.shared_gate) if cfg.n_shared_experts > 0 else None
        )
        self._micro: int | None = None  # micro-batch id within the step; None = not tracked
        self._counts: tuple[int, torch.Tensor | None] = (-1, None)  # (micro id, cumulative counts)
        self.reset_parameters()

    def start_micro_batch(self, index: int) -> None:
        """Mark the start of micro-batch `index` of an optimizer step (0 starts a new step)."""
        self._micro = index
        if index == 0:
            self._counts = (-1, None)

    def _balance_counts(self, expert_idx_TK: torch.Tensor) -> torch.Tensor | None:
        """The counts behind the lb loss's f: None (this micro-batch's own) unless global."""
        if self.cfg.balance_scope != "global" or not self.training:
            return None
        seen, now = self._counts
        if self._micro is not None and seen == self._micro and now is not None:
            return now  # activation checkpointing recomputes this forward: same counts, no collective
        local = torch.bincount(expert_idx_TK.reshape(-1), minlength=self.cfg.n_experts)
        if self.count_reducer is not None:
            local = self.count_reducer(local)
        if self._micro is None:
            return local
        base = now if now is not None else torch.zeros_like(local)
        self._counts = (self._micro, base + local)
        return base + local

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Router by its own init; experts and shared experts with N(0, std) inputs and N(0, out_std) outputs."""
        out_std = std if out_std is None else out_std
        if self.cfg.expert_out_std is not None:
            out_std = self.cfg.expert_out_std
        self.router.reset_parameters()
        self.experts.reset_parameters(std, out_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)
            if self.shared.gate is not None:
                nn.init.normal_(self.shared.gate.weight, std=std)

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor in force: capacity_factor in training, eval_capacity_factor in eval mode (None =
        dropless)."""
        return self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, stats: bool = True
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """x (..., D) -> (y of the same shape, MoEStats). `mask` (...) marks real tokens: padding is not routed and not
        counted in the losses or statistics. `stats=False` (decoding) skips the losses and statistics (None)."""
        cfg = self.cfg
        shape = x.shape
        with phase("permute"):
            x_TD = x.reshape(-1, cfg.d_model)
        valid_idx = None
        if mask is not None:
            with phase("permute"):
                valid_idx = mask.reshape(-1).nonzero().squeeze(-1)
                x_TD = x_TD.index_select(0, valid_idx)
        T = x_TD.shape[0]

        with phase("router"):
            r = self.router(x_TD)
        d = None
        if self._few(T):
            y_TD = self.experts.forward_few(x_TD, r.expert_idx_TK, r.weights_TK)
        else:
            with phase("permute"):
                d = dispatch(r.expert_idx_TK, r.weights_TK, cfg.n_experts, self.capacity_factor)
                w_N = r.weights_TK.reshape(-1).index_select(0, d.slot_idx_N)
            y_TD = self.experts(x_TD, d.token_idx_N, w_N, d.counts_E)  # permute, experts, combine inside
        if self.shared is not None:
            with phase("shared experts"):
                y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)

        if valid_idx is not None:
            with phase("combine"):
                y_full = torch.zeros((shape.numel() // cfg.d_model, cfg.d_model), dtype=y_TD.dtype, device=x.device)
                y_TD = y_full.index_copy(0, valid_idx, y_TD)

        out = None
        if stats:
            if d is None:
                d = dispatch(r.expert_idx_TK, r.weights_TK, cfg.n_experts, self.capacity_factor)
            with phase("aux losses"):
                out = self._stats(r, d, T, x.device)
        with phase("combine"):
            return y_TD.reshape(shape).to(x.dtype), out

    def _few(self, T: int) -> bool:
        """Decoding: no gradient, no capacity, and fewer assignments than experts - each chosen expert runs
        on its own rows (the grouped matmul's fixed cost is for many tokens)."""
        return (
            not torch.is_grad_enabled()
            and self.capacity_factor is None
            and T * self.cfg.top_k <= self.cfg.n_experts
            and self.experts.dropout == 0
        )

    def _stats(self, r, d, T: int, device: torch.device) -> MoEStats:
        """The auxiliary losses (in the graph) and the routing statistics of one forward."""
        cfg = self.cfg
        lb = load_balancing_loss(
            probs_TE=r.probs_TE,
            expert_idx_TK=r.expert_idx_TK,
            n_experts=cfg.n_experts,
            counts_E=self._balance_counts(r.expert_idx_TK),
        )
        z = router_z_loss(logits_TE=r.logits_TE)
        n_assign = max(T * cfg.top_k, 1)
        return MoEStats(
            lb_loss=lb,
            z_loss=z,
            aux_loss=cfg.lb_coef * lb + cfg.z_coef * z,
            tokens_per_expert=d.routed_E,
            dropped_fraction=torch.tensor(d.n_dropped / n_assign, device=device),
            router_entropy=router_entropy(r.probs_TE.detach()),
            max_violation=max_violation(d.routed_E),
        )
