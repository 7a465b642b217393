from .dispatch import dispatch, expert_capacity
from .experts import GroupedExperts, gmm
from .layer import MoE, MoEStats, SharedExperts
from .losses import load_balancing_loss, max_violation, router_entropy, router_z_loss
from .router import Router

__all__ = [
    "MoE",
    "MoEStats",
    "SharedExperts",
    "Router",
    "GroupedExperts",
    "gmm",
    "dispatch",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
    "max_violation",
]
