"""moelab: train, measure, convert and fine-tune Mixture-of-Experts language models."""

from .config import ConfigError, ModelConfig, MoEConfig
from .model import ModelOutput, Transformer
from .moe import MoE, MoEStats

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEStats", "Transformer", "ModelConfig", "ModelOutput", "ConfigError"]
