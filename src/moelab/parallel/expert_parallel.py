"""Expert parallelism: each rank of an expert-parallel group holds n_experts / E experts.

It plugs into the MoE layer's own seam: `MoE.experts(x_TD, token_idx_N, w_N, counts_E)`.
The router and dispatch run on every rank for its own tokens, as in one process; then

1. the per-expert row counts are exchanged (`all_to_all_single`, equal splits), so each
   rank knows how many rows it will receive from every other rank for each local expert;
2. the rows go to the ranks that hold their experts (`all_to_all_single` with the real,
   uneven split sizes), are regrouped by local expert and run through the local
   `GroupedExperts` (the same grouped-matmul path as one process);
3. the outputs go back the same way, and are weighted and summed into their tokens.

Both exchanges are autograd functions whose backward is the reverse exchange, so
gradients reach the experts from every rank's tokens and flow back to the router. Every
rank calls every collective on every step, also with zero rows to send or receive (an
expert, or a whole rank, that gets no token): nothing waits on a collective another rank
skips, and the autograd graph has the same collectives on every rank.

A faster transport (e.g. DeepEP on GPUs) would replace `_exchange`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError
from ..moe import MoE
from ..moe.experts import GroupedExperts
from ..phases import phase


class _Exchange(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g_ND):
        out_splits, in_splits = ctx.splits
        grad = g_ND.new_empty((sum(in_splits), *g_ND.shape[1:]))
        dist.all_to_all_single(grad, g_ND.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


def _exchange(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _Exchange.apply(x_ND, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """The local slice (experts [rank * E_l, (rank + 1) * E_l)) of a GroupedExperts, behind
    the same call signature; `group` is the expert-parallel process group."""

    def __init__(self, full: GroupedExperts, group, rank: int, size: int):
        super().__init__()
        n_experts = full.w_gate.shape[0]
        if n_experts % size:
            raise ConfigError(f"parallel.expert: {size} does not divide model.moe.n_experts={n_experts}")
        self.group, self.rank, self.size, self.n_experts = group, rank, size, n_experts
        self.n_local = n_experts // size
        lo, hi = rank * self.n_local, (rank + 1) * self.n_local
        d_model, d_expert = full.w_gate.shape[2], full.w_gate.shape[1]
        self.local = GroupedExperts(self.n_local, d_model, d_expert, full.backend, full.dropout)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(self.local, name).copy_(getattr(full, name)[lo:hi])

    def forward(
        self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, w_N: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of expert outputs per token, as `GroupedExperts.forward`; (T, D)."""
        S, El = self.size, self.n_local
        send_SE = counts_E.to(torch.int64).view(S, El)  # rows for each destination rank, per its local expert
        recv_SE = torch.empty_like(send_SE)
        with phase("all-to-all"):
            dist.all_to_all_single(recv_SE, send_SE.contiguous(), group=self.group)
            in_splits, out_splits = send_SE.sum(1).tolist(), recv_SE.sum(1).tolist()
        with phase("permute"):
            x_ND = x_TD.index_select(0, token_idx_N)
        with phase("all-to-all"):
            recv_MD = _exchange(x_ND, out_splits, in_splits, self.group)  # by source rank, then local expert
        with phase("permute"):  # regroup by local expert (rows of expert e from rank 0, then rank 1, ...)
            src_e = torch.repeat_interleave(torch.arange(El).repeat(S), recv_SE.reshape(-1))
            order = torch.argsort(src_e, stable=True)
            grouped = recv_MD.index_select(0, order)
            counts_local = recv_SE.sum(0)
            rows = torch.arange(grouped.shape[0], device=grouped.device)
        y_grouped = self.local(
            grouped, rows, torch.ones(grouped.shape[0], dtype=grouped.dtype, device=grouped.device), counts_local
        )
        with phase("permute"):
            y_MD = torch.empty_like(y_grouped).index_copy(0, order, y_grouped)
        with phase("all-to-all"):
            y_ND = _exchange(y_MD, in_splits, out_splits, self.group)
        with phase("combine"):
            return torch.zeros_like(x_TD).index_add(0, token_idx_N, y_ND * w_N.unsqueeze(-1).to(y_ND.dtype))


def shard_experts(model: nn.Module, group, rank: int, size: int) -> int:
    """Replace every MoE layer's experts by this rank's expert-parallel slice; returns how
    many layers were sharded. The rest of the model stays replicated."""

    n = 0
    for mod in model.modules():
        if isinstance(mod, MoE) and isinstance(mod.experts, GroupedExperts):
            mod.experts = ExpertParallelExperts(mod.experts, group, rank, size)  # type: ignore[assignment]  # same call signature as GroupedExperts
            n += 1
    return n
