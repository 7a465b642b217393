"""Decoder building blocks: RMSNorm, rotary embeddings, attention (SwiGLU lives in `moelab.ffn`).

Legend: B batch, S sequence, D model dim, H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ffn import SwiGLU
from .cache import KVCache

__all__ = ["RMSNorm", "SwiGLU", "Attention", "rope_cache", "apply_rope"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) * gain over the last dimension, computed in fp32 and returned in x's dtype."""
        # Normalise in fp32 (as Llama does), return in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (S, Dh) in the half-rotation layout used by Llama/HF."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the head dimension by the position angles (RoPE, rotate-half layout); shape kept."""
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSDh * cos_SDh + rotated * sin_SDh).to(x_BHSDh.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention via scaled_dot_product_attention."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        qkv_bias: bool = False,
        qk_norm: str = "none",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # q/k RMSNorm before rotary embeddings: per head (Qwen3) or over all heads (OLMoE).
        self.qk_norm = qk_norm
        qd, kd = {
            "head": (self.head_dim, self.head_dim),
            "full": (n_heads * self.head_dim, n_kv_heads * self.head_dim),
        }.get(qk_norm, (0, 0))
        self.q_norm = RMSNorm(qd, norm_eps) if qd else None
        self.k_norm = RMSNorm(kd, norm_eps) if kd else None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Causal grouped-query self-attention: (B, S, D) -> (B, S, D). Padding is right-side, so causality
        already hides it. cos/sin are (max_seq_len, Dh) from position 0, or (B, 1, S, Dh) at each token's
        own position when decoding with `cache` (which this call reads and extends as layer `layer`)."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|G, S, Dh)
        if cos.dim() == 2:
            cos, sin = cos[:S], sin[:S]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            k, v, attn_mask = cache.update(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))
