"""Apply a layout to a single-device model from outside, as torchtitan does: expert
parallelism behind the MoE layer's experts seam, then FSDP2 (`fully_shard`) per block,
then the gradient arithmetic that makes every parameter's update equal one process's
over the same global batch.

Gradient scale. Each rank's loss is the mean over its own tokens; FSDP2 averages
gradients over its mesh. For dense weights that mesh is the whole data-parallel world,
so the average is the global-batch gradient. An expert's gradient, however, already sums
the contributions of the E ranks of its expert-parallel group (the all-to-all brings
their tokens to it), and FSDP2 then averages over only W / E expert-data-parallel
ranks: E times too large (DeepSpeed #5618). `finish_gradients` divides expert gradients
by E before the norm is taken.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from ..model.transformer import compile_block
from ..moe import MoE
from ..runtime import is_dtensor
from .expert_parallel import ExpertParallelExperts, shard_experts
from .mesh import Parallel

EXPERT_PREFIX = ".experts.local."  # parameter names of an expert-parallel slice


def sum_over_ranks(counts: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The MoE layer's count reducer under data parallelism: `counts` summed over `group`
    (None = every rank), in place, and returned."""
    dist.all_reduce(counts, group=group)
    return counts


def parallelize(model: nn.Module, par: Parallel, compile_blocks: bool = False) -> None:
    """Shard `model` (a Transformer holding all weights, identical on every rank) in place:
    experts over the expert-parallel group, each slice fully_shard-ed over its
    expert-data-parallel ranks, every block and the root over the data mesh."""
    E = par.layout.expert
    if E > 1:
        shard_experts(model, par.ep_group, par.layout.ep_rank, E)
    for moe in model.modules():
        if isinstance(moe, MoE):
            moe.count_reducer = sum_over_ranks  # every rank is a data-parallel rank
    _shard_blocks(model.layers, par, compile_blocks)
    _fully_shard()(model, mesh=par.dense_mesh)


def _fully_shard():
    # imported when used: FSDP2 and DTensor cost a second of start-up to every command, most of which never shard
    from torch.distributed.fsdp import fully_shard

    return fully_shard


def _shard_blocks(blocks, par: Parallel, compile_blocks: bool = False) -> None:
    edp = par.edp_mesh if par.edp_mesh is not None else par.expert_mesh["edp"]
    fully_shard = _fully_shard()
    for block in blocks:
        if isinstance(block.ffn, MoE) and isinstance(block.ffn.experts, ExpertParallelExperts):
            fully_shard(block.ffn.experts.local, mesh=edp)
        if compile_blocks:
            compile_block(block)
        fully_shard(block, mesh=par.dense_mesh)


def parallelize_stages(rank_stages, par: Parallel) -> None:
    """`parallelize` for a pipeline rank's stages (a `RankStages`) over its stage's data
    ranks: experts over the expert-parallel group, blocks and each stage (the root of its
    embedding, norm and head) fully_shard-ed over the stage's data mesh. Each stage is an
    FSDP module, so the pipeline schedule syncs gradients once, after its last micro-batch."""
    E = par.layout.expert
    if E > 1:
        shard_experts(rank_stages, par.ep_group, par.layout.ep_rank, E)
    for moe in rank_stages.moe_layers():  # balance counts over this stage's data ranks, not the world
        moe.count_reducer = functools.partial(sum_over_ranks, group=par.dp_group)
    _shard_blocks(rank_stages.layers.values(), par)
    for stage in rank_stages.stages:
        _fully_shard()(stage, mesh=par.dense_mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


@torch.no_grad()
def finish_gradients(model: nn.Module, par: Parallel, max_norm: float) -> float:
    """After backward: fix the expert gradients' scale, clip all gradients to a global
    norm of `max_norm` (inf = no clipping) and return the norm before clipping, equal on
    every rank. Each shard's squared norm is counted once: dense shards are held by
    `replicate` ranks each, expert shards by one."""
    E, R = par.layout.expert, par.layout.replicate
    sq = torch.zeros((), dtype=torch.float32, device=par.device)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        expert = EXPERT_PREFIX in name
        if expert and E > 1:
            g.div_(E)
        sq += g.float().pow(2).sum() / (1 if expert else R)
        grads.append(g)
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if math.isfinite(max_norm) and math.isfinite(norm):
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def all_reduce_floats(values: list[float], par: Parallel, op: str = "mean") -> list[float]:
    """Sum, mean or max of a few numbers over all ranks, in one collective (fp64)."""
    t = torch.tensor(values, dtype=torch.float64, device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= par.world
    return t.tolist()


def all_reduce_loads(loads: list[torch.Tensor], par: Parallel) -> list[torch.Tensor]:
    """Per-layer expert loads summed over all ranks (one collective)."""
    if not loads:
        return loads
    flat = torch.cat([x.to(torch.float64).reshape(-1) for x in loads]).to(par.device)
    dist.all_reduce(flat)
    out, start = [], 0
    for x in loads:
        out.append(flat[start : start + x.numel()].view_as(x).to(x.dtype).to(x.device))
        start += x.numel()
    return out


def reduce_window(window, par: Parallel) -> None:
    """Make a MoEWindow's statistics global: expert loads summed over ranks, the per-layer
    means (lb/z loss, dropped fraction, entropy) averaged over ranks."""
    if not window.loads:
        return
    window.loads = all_reduce_loads(window.loads, par)
    keys = list(window.sums[0])
    means = all_reduce_floats([acc[k] for acc in window.sums for k in keys], par, op="mean")
    for i, acc in enumerate(window.sums):
        for j, k in enumerate(keys):
            acc[k] = means[i * len(keys) + j]
