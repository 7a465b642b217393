"""LoRA that reaches the experts: low-rank adapters as weight parametrizations.

W' = W + (alpha / r) * B @ A, with A (r, in) of variance 1/in (std 1/sqrt(in)) and B = 0 so the model is
unchanged at init. For the experts' 3-D weights (E, out, in) every expert gets its own
A (E, r, in) and B (E, out, r): a fused expert tensor is adapted per expert, never
skipped. Targets: attn (q, k, v, o), experts (routed w_gate, w_up, w_down), router,
ffn (dense FFNs and shared experts). A target that matches no parameter is an error.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..config import ConfigError

TARGETS = ("attn", "experts", "router", "ffn")


class LoRADelta(nn.Module):
    """A low-rank update B @ A (scaled by alpha / rank) of a weight of any leading shape: A (..., r, in) ~ N(0, 1/in)
    (variance 1/in), B (..., out, r) = 0, so training starts from the base weight."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float):
        super().__init__()
        *lead, out_f, in_f = shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(*lead, rank, in_f) / math.sqrt(in_f))
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The weight `w` plus the scaled low-rank update, in `w`'s dtype."""
        return w + self.scale * (self.lora_B @ self.lora_A).to(w.dtype)


def _matches(name: str, target: str) -> bool:
    if target == "attn":
        return ".attn.w" in name and name.endswith(".weight")
    if target == "experts":
        return ".ffn.experts.w_" in name
    if target == "router":
        return name.endswith(".router.weight")
    if target == "ffn":
        return (
            ".ffn." in name
            and ".experts." not in name
            and ".router." not in name
            and "gate.weight" not in name
            and name.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down")
        )
    return False


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> int:
    """Freeze the model and add adapters; returns the number of adapted tensors."""
    for t in targets:
        if t not in TARGETS:
            raise ConfigError(f"lora.targets: unknown target '{t}' (expected some of {list(TARGETS)})")
    if rank < 1:
        raise ConfigError(f"lora.rank: expected a positive integer, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    plan = []
    for t in targets:
        found = [n for n, _ in model.named_parameters() if _matches(n, t)]
        if not found:
            raise ConfigError(
                f"lora.targets: '{t}' matches no parameter of this model, so it would train "
                "nothing" + (" (the model has no experts)" if t in ("experts", "router") else "")
            )
        plan += found
    for name in plan:
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        w = getattr(mod, attr)
        parametrize.register_parametrization(mod, attr, LoRADelta(w.shape, rank, alpha).to(w.device))
    return len(plan)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight and remove the parametrization."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for attr in list(mod.parametrizations.keys()):  # type: ignore[union-attr,operator]  # a ModuleDict once parametrized
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
