"""Routed SwiGLU experts: gather -> grouped matmuls -> weighted scatter-add.

Legend: T tokens, N kept token-expert assignments (grouped by expert), D model dim,
F expert hidden, E experts.

Two backends compute the same thing under plain autograd:
- "grouped_mm": one `torch.nn.functional.grouped_mm` call per projection for all
  experts (fp32 on CPU, bf16 on CUDA sm80+, 16-byte-aligned strides). Its backward
  needs a materialised incoming gradient; the weighted scatter-add in front of it
  always provides one, so `.sum().backward()` works.
- "loop": per-expert matmuls under plain autograd, for every other dtype/shape. Weights
  are `unbind`-ed and rows `split`: indexing `w[e]` in a loop would make autograd
  zero-fill a gradient the size of all experts once per expert.
"auto" picks grouped_mm where it is known to work.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..phases import phase

Backend = Literal["auto", "grouped_mm", "loop"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_supported(x: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether F.grouped_mm accepts these operands (dtype, device, stride alignment)."""
    if not _HAS_GROUPED_MM or x.dtype != w_EOI.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype == torch.float32
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    else:
        ok_dtype = False
    # Both inner dims must give 16-byte row strides (forward and the transposed backward).
    align = 16 // x.element_size()
    return ok_dtype and w_EOI.shape[1] % align == 0 and w_EOI.shape[2] % align == 0


# ---- the grouped-matmul seam: where a faster kernel plugs in ----
def gmm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Group e's rows times w[e].T: (N, I), (E, O, I) -> (N, O)."""
    return F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)


def loop_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Reference grouped matmul: rows x_NI split by `sizes` into per-expert groups, each times its w_EOI[e]^T; (N, I) ->
    (N, O)."""
    outs = [F.linear(x_nI, w_OI) for x_nI, w_OI in zip(x_NI.split(sizes), w_EOI.unbind(0), strict=True)]
    return torch.cat(outs, dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors: w_gate, w_up (E, F, D); w_down (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: Backend = "auto", dropout: float = 0.0):
        super().__init__()
        self.backend: Backend = backend
        self.dropout = dropout
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_expert))

    def reset_parameters(self, std: float, out_std: float) -> None:
        """w_gate and w_up ~ N(0, std); w_down ~ N(0, out_std), per expert."""
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def forward(
        self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, w_N: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of expert outputs per token. Rows n are grouped by expert
        (`counts_E[e]` each, in expert order); token_idx_N says which token each row
        reads and receives, w_N its routing weight. Returns (T, D)."""
        dtype = x_TD.dtype
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
        with torch.autocast(x_TD.device.type, enabled=False):
            with phase("experts"):
                w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
            with phase("permute"):
                x_TD, w_N = x_TD.to(dtype), w_N.to(dtype)
                backend = self.backend
                if backend == "auto":
                    backend = "grouped_mm" if grouped_mm_supported(x_TD, w_gate) else "loop"
                if backend == "grouped_mm":
                    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
                    mm = lambda a, w: gmm(a, w, offs_E)  # noqa: E731
                else:
                    sizes = counts_E.tolist()  # one host sync, not three
                    mm = lambda a, w: loop_linear(a, w, sizes)  # noqa: E731
                x_ND = x_TD.index_select(0, token_idx_N)
            with phase("experts"):
                h_NF = F.silu(mm(x_ND, w_gate)) * mm(x_ND, w_up)
                if self.dropout and self.training:
                    h_NF = F.dropout(h_NF, self.dropout)
            # The routing weight goes on the narrower side of the down projection.
            if h_NF.shape[1] <= x_TD.shape[1]:
                with phase("combine"):
                    h_NF = h_NF * w_N.unsqueeze(-1)
                with phase("experts"):
                    y_ND = mm(h_NF, w_down)
            else:
                with phase("experts"):
                    y_ND = mm(h_NF, w_down)
                with phase("combine"):
                    y_ND = y_ND * w_N.unsqueeze(-1)
            with phase("combine"):
                return torch.zeros_like(x_TD).index_add(0, token_idx_N, y_ND)

    def forward_few(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The same weighted sum for a few tokens at inference (decoding): each chosen expert runs once on
        the rows that chose it, straight from its weight views - no dispatch, no empty groups, no copy of
        the expert stacks. (T, D) -> (T, D)."""
        T, K = expert_idx_TK.shape
        if T == 1:  # one token (batch-1 decoding): its K experts, with the fewest ops - each op costs microseconds
            y_1D: torch.Tensor | None = None
            for e, w in zip(expert_idx_TK[0].tolist(), weights_TK[0].tolist(), strict=True):
                h_1F = F.silu(F.linear(x_TD, self.w_gate[e])) * F.linear(x_TD, self.w_up[e])
                o_1D = F.linear(h_1F, self.w_down[e])
                y_1D = o_1D * w if y_1D is None else torch.add(y_1D, o_1D, alpha=w)
            assert y_1D is not None
            return y_1D
        flat_N = expert_idx_TK.reshape(-1)
        order_N = flat_N.argsort(stable=True)
        token_N = order_N // K
        w_N = weights_TK.reshape(-1).index_select(0, order_N).to(x_TD.dtype).unsqueeze(-1)
        x_ND = x_TD.index_select(0, token_N)
        chosen, sizes = flat_N.index_select(0, order_N).unique_consecutive(return_counts=True)
        outs, start = [], 0
        for e, n in zip(chosen.tolist(), sizes.tolist(), strict=True):
            x_nD = x_ND[start : start + n]
            h_nF = F.silu(F.linear(x_nD, self.w_gate[e])) * F.linear(x_nD, self.w_up[e])
            outs.append(F.linear(h_nF, self.w_down[e]))
            start += n
        y_ND = torch.cat(outs) * w_N
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)
