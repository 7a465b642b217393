"""Training state as one flat dict of global tensors, for `torch.distributed.checkpoint`.

Keys are layout-free: `model.<name>` for weights and buffers, `optim.<name>.<state>` for
AdamW's moments and step, with the names one process uses (an expert-parallel slice
`...experts.local.w_gate` is `...experts.w_gate`). Values are each rank's share:
FSDP2's sharded DTensors as they are, expert slices wrapped as DTensors of the full
(n_experts, ...) tensor on the (ep, edp) mesh. DCP writes each rank's part with the
global shapes, so a checkpoint loads under any other layout, or in one process without
a process group, by reading the chunks each target needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..runtime import is_dtensor
from .mesh import Parallel
from .parallelize import EXPERT_PREFIX


def canonical_name(name: str) -> str:
    """A parameter's name in the single-process model."""
    return name.replace(EXPERT_PREFIX, ".experts.")


def _global(name: str, t: torch.Tensor, par: Parallel | None) -> torch.Tensor:
    if par is None or par.layout.expert == 1 or EXPERT_PREFIX not in name or t.dim() == 0:
        return t
    from torch.distributed.tensor import DTensor, Shard

    local = t.to_local() if is_dtensor(t) else t
    shape = torch.Size((t.shape[0] * par.layout.expert, *t.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, par.expert_mesh, [Shard(0), Shard(0)], shape=shape, stride=stride)


def _ensure_state(opt: torch.optim.Optimizer) -> None:
    # optimizers make their state lazily, at each parameter's first step; a checkpoint loads into it in place, so every
    # moelab optimizer creates it on demand (moelab.train.optim.OptimizerKind)
    ensure = getattr(opt, "ensure_state", None)
    if ensure is None:
        raise TypeError(f"{type(opt).__name__} has no ensure_state(): a checkpoint cannot be loaded into its state")
    ensure()


def optimizer_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Canonical parameter names in the optimizer's order (its state_dict's indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [canonical_name(names[id(p)]) for g in opt.param_groups for p in g["params"]]


def training_state(model: nn.Module, opt: torch.optim.Optimizer | None, par: Parallel | None) -> dict:
    """The flat dict of this rank's shares of every weight, buffer and optimizer tensor."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        out["model." + canonical_name(k)] = _global(k, v, par)
    if opt is not None:
        _ensure_state(opt)
        names = {id(p): n for n, p in model.named_parameters()}
        for p in (p for g in opt.param_groups for p in g["params"]):
            for k, v in opt.state[p].items():
                out[f"optim.{canonical_name(names[id(p)])}.{k}"] = _global(names[id(p)], v, par)
    return out


@torch.no_grad()
def fill_state(state: dict, full: dict[str, torch.Tensor]) -> None:
    """Fill `state` in place from full tensors (a single-process checkpoint): each rank
    copies the chunk its DTensor holds. Raises KeyError naming a missing key."""
    for k, target in state.items():
        src = full[k]
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            piece = distribute_tensor(
                src.to(target.device), target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
            target.to_local().copy_(piece)
        else:
            target.copy_(src)
