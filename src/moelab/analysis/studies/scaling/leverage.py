"""From two fitted laws to the question a user has: at compute C, how much compute would a
dense model need to reach the MoE's loss? The efficiency leverage EL(C) = C_dense / C,
where C_dense is the dense model's compute-optimal compute at the loss the MoE reaches
compute-optimally with C.

Compute of one run: FLOPs per token x tokens. FLOPs per token against N is fitted per family
over its grid (a power law: attention and the head make it more than 6N at small widths),
so a frontier can move N and D at a fixed C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .law import Law


@dataclass(frozen=True)
class Family:
    """One model family's law and its cost model: FLOPs per token = u * N^v, seconds per FLOP
    measured on this machine."""

    law: Law
    u: float
    v: float
    s_per_flop: float

    def frontier(self, c: float) -> tuple[float, float, float]:
        """The compute-optimal (N, D, loss) at compute `c`: with D = c / (u N^v), dL/dN = 0 at
        N^(alpha + v beta) = alpha A c^beta / (beta v B u^beta)."""
        law = self.law
        log_n = (
            math.log(law.alpha * law.A / (law.beta * self.v * law.B)) + law.beta * (math.log(c) - math.log(self.u))
        ) / (law.alpha + self.v * law.beta)
        n = math.exp(log_n)
        d = c / (self.u * n**self.v)
        return n, d, float(law.loss(n, d))


def fit_cost(n, flops_per_token) -> tuple[float, float]:
    """(u, v) of FLOPs per token = u * N^v, least squares in log space."""
    x, y = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(flops_per_token, dtype=float))
    if len(set(np.round(x, 9))) < 2:
        return float(np.exp(np.mean(y - x))), 1.0
    v, log_u = np.polyfit(x, y, 1)
    return float(math.exp(log_u)), float(v)


def leverage(dense: Family, moe: Family, c: float) -> float:
    """EL(c): the dense family's compute-optimal compute to reach the MoE's compute-optimal loss
    at `c`, over `c`. inf when that loss is below everything the dense law reaches."""
    target = moe.frontier(c)[2]
    if target <= dense.law.E * (1 + 1e-9):
        return math.inf
    lo, hi = math.log(c) - 30, math.log(c) + 40
    if dense.frontier(math.exp(hi))[2] > target:
        return math.inf
    if dense.frontier(math.exp(lo))[2] < target:
        return math.exp(lo) / c
    for _ in range(60):  # the frontier's loss falls as compute grows: bisection
        mid = (lo + hi) / 2
        if dense.frontier(math.exp(mid))[2] > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2) / c


def clock_leverage(dense: Family, moe: Family, c: float) -> float:
    """EL in seconds on this machine: the dense model's seconds to the MoE's loss over the MoE's
    seconds at compute `c` (each family's measured seconds per FLOP)."""
    return leverage(dense, moe, c) * dense.s_per_flop / moe.s_per_flop
