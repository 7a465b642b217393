from .blocks import Attention, RMSNorm, SwiGLU
from .transformer import ModelOutput, Transformer

__all__ = ["Attention", "RMSNorm", "SwiGLU", "ModelOutput", "Transformer"]
