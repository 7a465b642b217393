"""A plain, slow MoE forward used as the reference in tests.

Written to be obviously correct rather than fast: per-expert Python loops, explicit
capacity bookkeeping, weights indexed directly. It reads the parameters of a `MoE`
module, so outputs *and* gradients can be compared with the fast path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_moe(
    moe, x: torch.Tensor, mask: torch.Tensor | None = None, expert_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The MoE layer's output computed by a plain per-token, per-expert loop with the layer's own routing (or the
    experts `expert_idx` (T, K) names, combine weights still the router's); the reference the tests compare against.
    x (..., D) -> same shape."""
    cfg = moe.cfg
    x_TD = x.reshape(-1, cfg.d_model)
    keep_rows = torch.arange(x_TD.shape[0]) if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    xs = x_TD[keep_rows]
    T = xs.shape[0]

    logits = xs.float() @ moe.router.weight.float().T
    scores = logits.softmax(-1) if cfg.router == "softmax" else logits.sigmoid()
    choice = scores if moe.router.bias is None else scores + moe.router.bias
    idx = choice.detach().topk(cfg.top_k, dim=-1).indices if expert_idx is None else expert_idx
    w = scores.gather(-1, idx)
    if cfg.renormalize:
        w = w / w.sum(-1, keepdim=True)

    cf = moe.capacity_factor
    cap = math.inf if cf is None else math.ceil(cf * T * cfg.top_k / cfg.n_experts)
    out = torch.zeros_like(xs)
    ex = moe.experts
    for e in range(cfg.n_experts):
        pairs = [(t, k) for t in range(T) for k in range(cfg.top_k) if idx[t, k] == e]
        # Keep the highest-weight assignments; ties go to the earlier token.
        pairs.sort(key=lambda tk: -float(w[tk[0], tk[1]].detach()))
        pairs = pairs[: int(cap) if cap != math.inf else len(pairs)]
        for t, k in pairs:
            h = F.silu(ex.w_gate[e] @ xs[t]) * (ex.w_up[e] @ xs[t])
            out[t] = out[t] + w[t, k] * (ex.w_down[e] @ h)
    if moe.shared is not None:
        sh = moe.shared
        y = F.silu(xs @ sh.w_gate.T) * (xs @ sh.w_up.T) @ sh.w_down.T
        if sh.gate is not None:
            y = torch.sigmoid(xs @ sh.gate.weight.T) * y
        out = out + y
    full = torch.zeros_like(x_TD)
    full[keep_rows] = out
    return full.reshape(x.shape)
