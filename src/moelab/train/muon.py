"""Muon for MoE models: orthogonalised momentum for every weight matrix, expert by expert
for the (E, A, B) expert stacks, and AdamW for the rest (embeddings, head, norms, biases,
router) - one optimizer, so checkpoints, resume and consolidation treat it like AdamW.

Update of a matrix W (A, B) with gradient G, momentum mu, Nesterov (Keller Jordan's Muon):
    M <- mu M + (1 - mu) G;  U = NS((1 - mu) G + mu M);  W <- W (1 - lr wd) - lr s U
where NS is `optim.ns_steps` quintic Newton-Schulz steps that push every singular value of
U/|U|_F towards 1 (orthogonal "enough"), and s = 0.2 sqrt(max(A, B)) matches
the RMS of the update to AdamW's typical ~0.2 (Moonlight, arXiv 2502.16982), so AdamW's
learning rate and weight decay carry over unchanged. An expert stack (E, A, B) is E
matrices: the iteration runs batched over E, each expert's update shaped by its own
gradient, and s is taken from (A, B) - or, with `optim.muon_experts=stacked`, the stack
is the one wide matrix the layer computes with (w_gate and w_up (E*F, D), w_down
(D, E*F)), orthogonalised whole, s from its shape: an expert's share of the update then
follows its share of the gradient. With `optim.muon_experts=dion` the expert stacks take Dion's low-rank orthonormal
update instead (moelab.train.dion: ~10x fewer FLOPs than Newton-Schulz at a quarter rank), the same spectral step s.

The orthogonalisation (moelab.train.polar) runs with every Muon matrix of the same shape - all layers' expert stacks
at once - in batched calls, with Jordan's quintic by default or Polar Express's per-step ones (`optim.ns_coeffs`), in
fp32 by default or in bf16 (`optim.ns_dtype=bf16`; `auto`: bf16 where the device multiplies it natively;
`torch.optim.Muon` always iterates in bf16). The fp32 iteration makes the same step taken under another parallel
layout (whose gradients differ by summation order, ~1e-10) land on the same weights to ~1e-6; and a sharded matrix (an
FSDP2 DTensor) is gathered whole, orthogonalised by one owner rank - the matrices spread over the ranks that share
them, largest first to the least loaded, as Moonlight's and dion's distributed Muon do - and sent to the others, each
keeping its shard. Experts under expert parallelism are whole on their rank and need no gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..phases import phase
from ..runtime import is_dtensor
from . import dion
from .polar import Coeffs, fast_dtype, orthogonalise


def scale(shape: tuple[int, ...]) -> float:
    """The update scale of a matrix of `shape` (..., A, B): 0.2 sqrt(max(A, B)), AdamW's update RMS."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def _orthogonalised(
    updates: list[torch.Tensor], axes: list[int | None], steps: int, kind: Coeffs, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], int]:
    """Each update orthogonalised (an expert stack along `axes` as one matrix), a sharded one whole and cut back to
    its shard; and how many matrices this rank iterated. A sharded matrix is iterated by one owner rank of the ranks
    that share it, chosen by shape to balance the work, and sent to the others: the Newton-Schulz work of a step is
    divided over the ranks instead of repeated on each, and a rank holds whole only the matrices it owns."""
    groups: dict[dist.ProcessGroup | None, list[int]] = {}
    for i, u in enumerate(updates):
        groups.setdefault(_sharing_group(u), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    count = 0
    for group, idx in groups.items():  # the same order on every rank: the collectives below pair up
        shapes = [_stacked_shape(updates[i].shape, axes[i]) for i in idx]
        ranks = 1 if group is None else dist.get_world_size(group)
        owners, me = _owners([_cost(s) for s in shapes], ranks), (0 if group is None else dist.get_rank(group))
        mine = {}
        for k, i in enumerate(idx):
            whole = _whole(updates[i])  # a collective for a shard: every rank takes part, the owner keeps it
            if owners[k] == me:
                mine[k] = _stacked(whole, axes[i])
        done = dict(zip(mine, orthogonalise(list(mine.values()), steps, kind, dtype), strict=True))
        count += sum(math.prod(shapes[k][:-2]) for k in mine)
        del mine
        for k, (i, o) in enumerate(zip(idx, owners, strict=True)):
            u = updates[i]
            # contiguous: a collective sends the storage, and a tall matrix comes back as a transposed view
            full = done.pop(k).contiguous() if o == me else torch.empty(shapes[k], device=u.device)
            if group is not None and ranks > 1:
                dist.broadcast(full, src=dist.get_global_rank(group, o), group=group)
            full = _unstacked(full, axes[i], u.shape).to(u.dtype)
            if is_dtensor(u):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, u.device_mesh, u.placements, src_data_rank=None)
            out[i] = full
    return [o for o in out if o is not None], count


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of a DTensor that holds it whole (replicated, or "sharded" over one rank) - an alias, so
    writing to it writes the DTensor - or `t` itself."""
    if not is_dtensor(t):
        return t
    local = t.to_local()
    if local.shape != t.shape:
        raise ValueError(f"Dion needs whole experts on each rank, got {tuple(local.shape)} of {tuple(t.shape)}")
    return local


def _whole(u: torch.Tensor) -> torch.Tensor:
    return u.full_tensor() if is_dtensor(u) else u


def _sharing_group(u: torch.Tensor) -> dist.ProcessGroup | None:
    """The ranks that hold a sharded update (an FSDP2 DTensor) and so could each iterate it; None for a tensor whole on
    this rank alone (one process, or an expert slice under expert parallelism)."""
    if not is_dtensor(u):
        return None
    mesh = u.device_mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():  # HSDP over the whole world
        return dist.group.WORLD
    return mesh.get_group(mesh.ndim - 1)  # (a pipeline stage's HSDP: owners among its shard ranks, replicas repeat)


def _cost(shape: tuple[int, ...]) -> int:
    """Newton-Schulz work of a matrix (or stack) of `shape`, ~ n A^2 B with A <= B."""
    a, b = sorted(shape[-2:])
    return math.prod(shape[:-2]) * a * a * b


def _owners(costs: list[int], ranks: int) -> list[int]:
    """Each item's owner: the largest first, each to the least loaded rank (the same answer on every rank)."""
    load, owners = [0] * ranks, [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        owners[k] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[k]] += costs[k]
    return owners


def _stacked(u: torch.Tensor, axis: int | None) -> torch.Tensor:
    """An (E, A, B) expert stack as one matrix: (E*A, B) for axis 0, (A, E*B) for axis 1; others as they are."""
    if axis is None:
        return u
    return u.reshape(-1, u.size(-1)) if axis == 0 else u.transpose(0, 1).reshape(u.size(1), -1)


def _unstacked(o: torch.Tensor, axis: int | None, shape: torch.Size) -> torch.Tensor:
    if axis is None:
        return o
    return o.reshape(shape) if axis == 0 else o.reshape(shape[1], shape[0], shape[2]).transpose(0, 1)


def _stacked_shape(shape: torch.Size, axis: int | None) -> tuple[int, ...]:
    """The shape `_stacked` gives a tensor of `shape`."""
    if axis is None:
        return tuple(shape)
    return (shape[0] * shape[1], shape[2]) if axis == 0 else (shape[1], shape[0] * shape[2])


def uses_muon(name: str, p: torch.Tensor, router: bool = False) -> bool:
    """Whether parameter `name` takes Muon updates: weight matrices and expert stacks; not
    embeddings, the output head, norms, biases, LoRA adapters, the shared-expert gate, or
    (unless `router`) the router."""
    if p.ndim < 2 or name.startswith(("embed.", "lm_head.")) or "lora_" in name or name.endswith("shared.gate.weight"):
        return False
    return router or ".router." not in name


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `algo`: "muon" (momentum, nesterov, ns_steps, ns_coeffs, ns_dtype), "dion" (momentum,
    rank_fraction:
    expert stacks only) or "adamw" (betas, eps); all take `lr` and `weight_decay` (decoupled). State: momentum_buffer
    for Muon, momentum_buffer and dion_basis for Dion, step / exp_avg / exp_avg_sq for AdamW, as torch.optim.AdamW
    names them."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, ns_steps=5,
                 ns_coeffs: Coeffs = "jordan", ns_dtype: str = "fp32"):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, nesterov=True,
                        ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_dtype=ns_dtype, algo="adamw")  # fmt: skip
        super().__init__(groups, defaults)
        self.ns_matrices = 0  # matrices this rank has orthogonalised (under FSDP2 each has one owner rank)

    def ensure_state(self) -> None:
        """Create every parameter's state now (it is otherwise made at its first step), so a checkpoint can load into it
        in place."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if st:
                    continue
                if group["algo"] in ("muon", "dion"):
                    st["momentum_buffer"] = torch.zeros_like(p)
                    if group["algo"] == "dion":
                        st["dion_basis"] = dion.initial_basis(p.shape, group["rank_fraction"], p.device)
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
        with phase("adamw"):
            for group in self.param_groups:
                if group["algo"] == "adamw":
                    for p in group["params"]:
                        if p.grad is not None:
                            p.mul_(1 - group["lr"] * group["weight_decay"])
                            self._adamw(p, self.state[p], group, group["lr"])
        dion_groups = [g for g in self.param_groups if g["algo"] == "dion"]
        if dion_groups:
            with phase("dion, expert stacks"):
                for group in dion_groups:
                    self._dion(group)
        # Muon's matrices are orthogonalised together, one batched call per shape, the expert stacks apart from the
        # rest so a profile can tell their cost from the dense matrices'
        pending: dict[tuple[int, Coeffs, torch.dtype, bool], list[tuple[torch.Tensor, dict, int | None]]] = {}
        for group in self.param_groups:
            if group["algo"] == "muon":
                axes = group.get("stack_axes") or [None] * len(group["params"])
                for p, axis in zip(group["params"], axes, strict=True):
                    if p.grad is not None:
                        # a checkpoint from before ns_dtype existed iterated in fp32, and resumes so
                        dtype = fast_dtype(group.get("ns_dtype", "fp32"), p.device)
                        key = (group["ns_steps"], group["ns_coeffs"], dtype, p.ndim == 3)
                        pending.setdefault(key, []).append((p, group, axis))
        for (steps, kind, dtype, stacks), items in pending.items():
            with phase("muon, expert stacks" if stacks else "muon, matrices"):
                updates = [self._momentum(p, group) for p, group, _ in items]
                done, iterated = _orthogonalised(updates, [a for *_, a in items], steps, kind, dtype)
                self.ns_matrices += iterated
                for (p, group, axis), o in zip(items, done, strict=True):
                    p.add_(o, alpha=-group["lr"] * scale(_stacked_shape(p.shape, axis)))
        return loss

    def _dion(self, group: dict) -> None:
        """Dion's step (moelab.train.dion) for each expert stack of `group` that has a gradient."""
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            # an expert-parallel slice is a DTensor over data ranks that each hold it whole (data_shard is refused),
            # its gradient already reduced: the step runs on the local tensors
            u = dion.step(_local(st["momentum_buffer"]), _local(p.grad), st["dion_basis"], group["momentum"])
            _local(p).add_(u.to(p.dtype), alpha=-group["lr"] * scale(p.shape))

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Decay the weight, fold the gradient into the momentum; the update to orthogonalise (Nesterov's, or the
        momentum buffer itself)."""
        p.mul_(1 - group["lr"] * group["weight_decay"])
        grad, buf, mu = p.grad, self.state[p]["momentum_buffer"], group["momentum"]
        assert grad is not None
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

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
