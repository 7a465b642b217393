"""Muon for MoE models: orthogonalised momentum for every weight matrix, expert by expert
for the (E, A, B) expert stacks, and AdamW for the rest (embeddings, head, norms, biases,
router) - one optimizer, so checkpoints, resume and consolidation treat it like AdamW.

Update of a matrix W (A, B) with gradient G, momentum mu, Nesterov (Keller Jordan's Muon):
    M <- mu M + (1 - mu) G;  U = NS5((1 - mu) G + mu M);  W <- W (1 - lr wd) - lr s U
where NS5 is five quintic Newton-Schulz steps that push every singular value of U/|U|_F
towards 1 (to about 0.7..1.2: orthogonal "enough"), and s = 0.2 sqrt(max(A, B)) matches
the RMS of the update to AdamW's typical ~0.2 (Moonlight, arXiv 2502.16982), so AdamW's
learning rate and weight decay carry over unchanged. An expert stack (E, A, B) is E
matrices: the iteration runs batched over E, each expert's update shaped by its own
gradient, and s is taken from (A, B).

Unlike `torch.optim.Muon` (2-D only, bf16 iteration) the iteration here runs in fp32, so
the same step taken under another parallel layout (whose gradients differ by summation
order, ~1e-10) lands on the same weights; and a sharded matrix (an FSDP2 DTensor) is
gathered whole, orthogonalised, and cut back to its shard, as torchtitan's and
Megatron's distributed Muon do. Experts under expert parallelism are whole on their rank
and need no gather.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(..., A, B) -> the same shape: each matrix's orthogonalisation (singular values near 1), in fp32."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def scale(shape: torch.Size) -> float:
    """The update scale of a matrix of `shape` (..., A, B): 0.2 sqrt(max(A, B)), AdamW's update RMS."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def _orthogonalised(update: torch.Tensor, steps: int) -> torch.Tensor:
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps).to(update.dtype)
    # a shard is not the matrix: orthogonalise the whole one, keep this rank's piece
    full = newton_schulz(update.full_tensor(), steps).to(update.dtype)
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


def uses_muon(name: str, p: torch.Tensor, router: bool = False) -> bool:
    """Whether parameter `name` takes Muon updates: weight matrices and expert stacks; not
    embeddings, the output head, norms, biases, LoRA adapters, the shared-expert gate, or
    (unless `router`) the router."""
    if p.ndim < 2 or name.startswith(("embed.", "lm_head.")) or "lora_" in name or name.endswith("shared.gate.weight"):
        return False
    return router or ".router." not in name


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `algo`: "muon" (momentum, nesterov, ns_steps) or "adamw" (betas,
    eps); both take `lr` and `weight_decay` (decoupled). State: momentum_buffer for Muon,
    step / exp_avg / exp_avg_sq for AdamW, as torch.optim.AdamW names them."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5):
        defaults = dict(lr=lr, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, nesterov=True,
                        ns_steps=ns_steps, algo="adamw")  # fmt: skip
        super().__init__(groups, defaults)

    def ensure_state(self) -> None:
        """Create every parameter's state now (it is otherwise made at its first step), so a checkpoint can load into it
        in place."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if st:
                    continue
                if group["algo"] == "muon":
                    st["momentum_buffer"] = torch.zeros_like(p)
                else:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ensure_state()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                p.mul_(1 - lr * wd)
                if group["algo"] == "muon":
                    buf, mu = st["momentum_buffer"], group["momentum"]
                    buf.lerp_(p.grad, 1 - mu)
                    update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                    p.add_(_orthogonalised(update, group["ns_steps"]), alpha=-lr * scale(p.shape))
                else:
                    self._adamw(p, st, group, lr)
        return loss

    @staticmethod
    def _adamw(p: torch.Tensor, st: dict, group: dict, lr: float) -> None:
        # torch.optim.AdamW's single-tensor arithmetic, after the decoupled decay above
        b1, b2 = group["betas"]
        st["step"] += 1
        n = float(st["step"])
        st["exp_avg"].lerp_(p.grad, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**n)).add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**n))
