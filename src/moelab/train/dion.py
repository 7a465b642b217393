"""Low-rank orthonormal updates for the routed experts (`optim.muon_experts=dion`): Dion's update (Ahn, Xu, Abreu,
Langford 2025, arXiv 2504.05295, Algorithm 1) for each expert matrix, batched over the experts of a stack.

Why: Newton-Schulz on a full A x B matrix costs ~ A^2 B per step, so Muon on E experts costs E/k times the dense FFN's
per token routed (docs/benchmarks.md); one power-iteration step at rank r costs ~ 8 A B r FLOPs (four A x B x r
products), so at r = A/4 the experts' orthogonalisation is ~10x cheaper. What the update does not take this step stays
in the momentum (error feedback) and is taken on later steps. What it costs in quality: docs/quality.md section 8.

Per matrix X (A x B, A <= B: a tall one is handled transposed), gradient G, momentum M, right basis Q (B x r):
    B_ = M + G;  P = orth(B_ Q) (A x r);  R = B_^T P (B x r)
    M <- B_ - (1 - mu) P R^T;  Q <- R with unit columns;  W <- W (1 - lr wd) - lr s P Q^T
with s = moelab.train.muon.scale(A, B), the same spectral step as Muon's: each of the r directions taken moves the
weight as far as one of Muon's does. A column of R that is zero (an expert no token has reached yet) is left out of
the update and keeps its basis vector, so an idle expert is not moved by a direction its gradient never had.
"""

from __future__ import annotations

import torch


def rank(shape: torch.Size | tuple[int, ...], fraction: float) -> int:
    """The rank kept of a matrix (or stack) of `shape` (..., A, B): `fraction` of its smaller side, at least 1."""
    return max(1, round(fraction * min(shape[-2], shape[-1])))


def basis_shape(shape: torch.Size | tuple[int, ...], fraction: float) -> tuple[int, ...]:
    """The shape of the right basis Q (..., B, r) kept for a stack of `shape` (..., A, B or B, A), B its larger side."""
    return (*shape[:-2], max(shape[-2], shape[-1]), rank(shape, fraction))


def initial_basis(shape: torch.Size | tuple[int, ...], fraction: float, device: torch.device) -> torch.Tensor:
    """The starting right basis Q (`basis_shape`) of a stack of `shape`: one unit-column Gaussian matrix for every
    expert, so an expert's start does not depend on which rank holds it (expert parallelism trains like one process),
    drawn from a generator of its own so that creating optimizer state (as a resume does before loading into it) never
    moves the run's random streams."""
    *lead, b, r = basis_shape(shape, fraction)
    q = torch.randn(b, r, generator=torch.Generator().manual_seed(0))
    return (q / q.norm(dim=0)).expand(*lead, -1, -1).contiguous().to(device)


def step(buf: torch.Tensor, grad: torch.Tensor, q: torch.Tensor, momentum: float, eps: float = 1e-8) -> torch.Tensor:
    """One Dion step of a stack (..., m, n): updates `buf` (the momentum, error feedback included) and `q` in place and
    returns the unit-spectral update P Q^T (fp32, the stack's shape)."""
    tall = buf.size(-2) > buf.size(-1)
    # an fp32 momentum is updated where it lies: at expert sizes the step is bound by its four products and by the
    # passes over the A x B stack, and a copy of the momentum and a materialised P R^T were ~a third of its time
    b_ = buf if buf.dtype == torch.float32 else buf.float()
    b_.add_(grad)
    x = b_.mT if tall else b_  # (..., A, B), A <= B, a view of b_
    p, _ = torch.linalg.qr(x @ q.float())  # (..., A, r) orthonormal columns
    r_ = x.mT @ p  # (..., B, r)
    _sub_product(x, p, r_.mT, 1 - momentum)  # the error feedback: what this step's update takes of B_
    if b_ is not buf:
        buf.copy_(b_)
    norms = r_.norm(dim=-2, keepdim=True)
    live = norms > eps
    q_new = torch.where(live, r_ / norms.clamp_min(eps), torch.zeros_like(r_))
    q.copy_(torch.where(live, q_new, q.float()))
    update = p @ q_new.mT
    return update.mT if tall else update


def _sub_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """x -= alpha a @ b in place (x may be a transposed view), the product not materialised where torch fuses it."""
    if x.ndim == 3:
        x.baddbmm_(a, b, alpha=-alpha)
    elif x.ndim == 2:
        x.addmm_(a, b, alpha=-alpha)
    else:
        x.sub_(a @ b, alpha=alpha)
