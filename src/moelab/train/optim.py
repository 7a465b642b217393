"""The optimizer (AdamW, or Muon for the weight matrices and expert stacks with AdamW for the rest) with its parameter
groups, and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..run_config import OPTIMIZERS as OPTIMIZER_NAMES
from ..run_config import OptimConfig
from .dion import basis_shape
from .muon import MuonAdamW, uses_muon


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only. Norm weights, biases and embeddings are not decayed:
    decaying a norm gain or a bias only pulls it toward an arbitrary zero, and rows of
    rare tokens in the embedding would be decayed away between their rare updates. The
    router weight is a matrix and is decayed (it also keeps logits small)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.startswith("embed."):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class AdamW(torch.optim.AdamW):
    """torch's AdamW with the state protocol every moelab optimizer keeps: `ensure_state()` creates the state a
    checkpoint loads into (torch makes it lazily, at each parameter's first step)."""

    def ensure_state(self) -> None:
        """Every parameter's step, exp_avg and exp_avg_sq, created now where missing."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass(frozen=True)
class OptimizerKind:
    """What moelab needs of an optimizer: `build(groups, cfg)` makes it over the parameter groups (decayed and not,
    routed experts split off when optim.expert_lr_mult is set); `state_bytes(name, param, cfg)` is the fp32 state it
    keeps per parameter as (bytes per element, bytes per tensor), which memory plans count with. The optimizer it
    builds has `ensure_state()` (create its state now, so a checkpoint - DCP under any layout - loads into it)."""

    build: Callable[[list[dict], OptimConfig], torch.optim.Optimizer]
    state_bytes: Callable[[str, torch.Tensor, OptimConfig | None], tuple[int, int]]


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return AdamW(groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _muon(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return MuonAdamW(
        groups, cfg.peak_lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.momentum, cfg.ns_steps, cfg.ns_coeffs, cfg.ns_dtype
    )


def _adamw_bytes(name: str, p: torch.Tensor, cfg: OptimConfig | None) -> tuple[int, int]:
    return 8, 4  # two fp32 moments per element, one step scalar per tensor


def _muon_bytes(name: str, p: torch.Tensor, cfg: OptimConfig | None) -> tuple[int, int]:
    if not takes_muon(name, p, cfg):
        return 8, 4  # AdamW's
    if cfg is not None and cfg.muon_experts == "dion" and routed_expert(name):
        return 4, 4 * math.prod(basis_shape(p.shape, cfg.dion_rank))  # the momentum, and Dion's right basis
    return 4, 0  # one momentum


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(_adamw, _adamw_bytes),
    "muon": OptimizerKind(_muon, _muon_bytes),
}


def register_optimizer(name: str, kind: OptimizerKind) -> None:
    """Make `optim.name=NAME` build `kind`: the memory plans, checkpoints and resumes under any layout follow from
    its `state_bytes` and its optimizer's `ensure_state`."""
    OPTIMIZERS[name] = kind
    if name not in OPTIMIZER_NAMES:
        OPTIMIZER_NAMES.append(name)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer over `param_groups(model)`: AdamW, or Muon (moelab.train.muon) for the matrices and
    expert stacks it takes with AdamW over the rest, by the same groups, or a registered one; the config's lr, betas,
    eps and weight decay either way."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: expected one of {sorted(OPTIMIZERS)}, got {cfg.name!r}")
    groups = param_groups(model, cfg.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    if cfg.name == "muon":
        muon = [p for p in groups[0]["params"] if takes_muon(names[id(p)], p, cfg)]
        taken = {id(p) for p in muon}
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in taken]
        groups.insert(0, {"params": muon, "weight_decay": cfg.weight_decay, "name": "muon", "algo": "muon"})
        if cfg.muon_experts == "dion":  # the routed experts take Dion's low-rank update (moelab.train.dion)
            experts = [p for p in muon if routed_expert(names[id(p)])]
            groups[0]["params"] = [p for p in muon if not routed_expert(names[id(p)])]
            groups.insert(1, {"params": experts, "weight_decay": cfg.weight_decay, "name": "dion", "algo": "dion",
                              "rank_fraction": cfg.dion_rank})  # fmt: skip
    if cfg.expert_lr_mult != 1.0:
        groups = _split_experts(groups, names, cfg.expert_lr_mult)
    groups = [g for g in groups if g["params"]]
    if cfg.name == "muon" and cfg.muon_experts == "stacked":
        for g in groups:
            if g.get("algo") == "muon":
                g["stack_axes"] = [_stack_axis(names[id(p)]) for p in g["params"]]
    return OPTIMIZERS[cfg.name].build(groups, cfg)


def routed_expert(name: str) -> bool:
    """Whether parameter `name` is a routed-expert stack (E, ., .): what muon_experts and expert_lr_mult act on (a
    shared expert is a dense FFN and is not one)."""
    return ".experts." in name


def takes_muon(name: str, p: torch.Tensor, cfg: OptimConfig | None) -> bool:
    """Whether `build_optimizer` gives parameter `name` Muon's update under `cfg` (the one rule the optimizer and the
    memory plans share)."""
    if cfg is None or cfg.name != "muon" or (cfg.muon_experts == "adamw" and routed_expert(name)):
        return False
    return uses_muon(name, p, cfg.muon_router)


def state_bytes(name: str, p: torch.Tensor, cfg: OptimConfig | None) -> tuple[int, int]:
    """The fp32 state `build_optimizer` keeps for parameter `name`: (bytes per element, bytes per tensor), as
    optim.name's kind declares it (no config: AdamW's). Memory plans count with it."""
    return OPTIMIZERS[cfg.name if cfg is not None else "adamw"].state_bytes(name, p, cfg)


def _split_experts(groups: list[dict], names: dict[int, str], mult: float) -> list[dict]:
    """Each group's routed-expert weights as a sibling group whose learning rate (and so
    its decoupled decay) is `mult` times the schedule's: an expert sees about k/E of the
    tokens, so its gradient is noisier and its effective step rarer than a dense weight's."""
    out = []
    for g in groups:
        experts = [p for p in g["params"] if routed_expert(names[id(p)])]
        rest = [p for p in g["params"] if not routed_expert(names[id(p)])]
        out.append(g | {"params": rest})
        if experts:
            out.append(g | {"params": experts, "name": g["name"] + "_experts", "lr_mult": mult})
    return out


def _stack_axis(name: str) -> int | None:
    """How a routed-expert stack joins into the layer's one wide matrix: w_gate and w_up (E, F, D) by their rows
    (E*F, D), w_down (E, D, F) by its columns (D, E*F); None for any other parameter."""
    if not routed_expert(name):
        return None
    return 1 if name.endswith("w_down") else 0


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine to
    min_lr_ratio * lr, or WSD (stable, then linear decay over the last decay_fraction),
    or constant."""
    peak = cfg.peak_lr
    floor = peak * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)
