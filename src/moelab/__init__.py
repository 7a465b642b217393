"""moelab: train, measure, convert and fine-tune Mixture-of-Experts language models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import ConfigError, ModelConfig, MoEConfig

if TYPE_CHECKING:
    from .model import ModelOutput, Transformer
    from .moe import MoE, MoEStats

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEStats", "Transformer", "ModelConfig", "ModelOutput", "ConfigError"]

# The modules behind these import torch: loaded on first use, so that `moelab --help`, a
# bad flag or a refused output answers before torch is imported (seconds on a small machine).
_LAZY = {"MoE": ".moe", "MoEStats": ".moe", "Transformer": ".model", "ModelOutput": ".model"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
