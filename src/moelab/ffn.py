"""The SwiGLU feed-forward block, shared by the dense model (`model/`) and the MoE layer's
shared experts (`moe/`): it lives below both so neither package imports the other's
internals."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); w_gate, w_up: (H, D), w_down: (D, H)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(d_model, hidden))

    def reset_parameters(self, std: float, out_std: float) -> None:
        """w_gate and w_up ~ N(0, std); w_down ~ N(0, out_std)."""
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: w_down(silu(w_gate x) * w_up x); (..., D) -> (..., D)."""
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)
