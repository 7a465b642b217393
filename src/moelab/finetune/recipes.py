"""Which parameters a fine-tuning recipe trains.

- full: everything.
- freeze-experts: everything but the routed experts (ST-MoE: about as good as full,
  cheaper, and generalises better).
- freeze-router: everything but the routers (keeps pretrained routing).
- experts-only: only the routed experts (ST-MoE found this hurts; here to measure it).
- lora: only low-rank adapters on `lora.targets` (see lora.py), experts included.
Shared experts count as non-expert weights: they see every token, like a dense FFN.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..model.lora import apply_lora

RECIPES = ("full", "freeze-experts", "freeze-router", "experts-only", "lora")


def group_of(name: str) -> str:
    """The parameter group of a parameter name: embeddings, attention, norms, dense_ffn, router, experts, shared_experts
    or lora_adapters."""
    if "lora_" in name:
        return "lora_adapters"
    if name.startswith("embed.") or name.startswith("lm_head."):
        return "embeddings"
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if ".ffn.shared." in name:
        return "shared_experts"
    if ".ffn." in name:
        return "dense_ffn"
    if ".attn." in name and "norm" not in name:
        return "attention"
    return "norms"


def parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The model's (name, parameter) pairs by group (see `group_of`)."""
    out: dict[str, list] = {}
    for n, p in model.named_parameters():
        out.setdefault(group_of(n), []).append((n, p))
    return out


def apply_recipe(model: torch.nn.Module, recipe: str, lora=None) -> None:
    """Freeze parameters (or add LoRA adapters from `lora`) as the recipe says: full, freeze-experts, freeze-router,
    experts-only or lora. ConfigError for a recipe that needs experts on a dense model."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    if recipe == "lora":
        apply_lora(model, lora.target_list(), lora.rank, lora.alpha)
        return
    groups = parameter_groups(model)
    if recipe != "full" and "experts" not in groups:
        raise ConfigError(f"--recipe {recipe}: this model has no experts (it is dense); use --recipe full")
    train = {
        "full": lambda g: True,
        "freeze-experts": lambda g: g != "experts",
        "freeze-router": lambda g: g != "router",
        "experts-only": lambda g: g == "experts",
    }[recipe]
    for g, params in groups.items():
        for _, p in params:
            p.requires_grad_(train(g))


def trainable_report(model: torch.nn.Module) -> dict:
    """Trainable and total parameters, overall and per group."""
    groups = parameter_groups(model)
    per = {
        g: {"trainable": sum(p.numel() for _, p in ps if p.requires_grad), "total": sum(p.numel() for _, p in ps)}
        for g, ps in sorted(groups.items())
    }
    return {
        "trainable": sum(v["trainable"] for v in per.values()),
        "total": sum(v["total"] for v in per.values()),
        "groups": per,
    }
