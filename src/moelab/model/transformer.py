"""Llama-style decoder whose FFNs are dense SwiGLU or MoE by layer pattern.

Initialisation (documented because MoE stability depends on it; N(0, s) names the
standard deviation s):
- embeddings and all projections ~ N(0, init_std);
- output projections of each residual branch (attention `wo`, FFN/expert `w_down`)
  ~ N(0, init_std / sqrt(2 * n_layers)), GPT-2's depth scaling;
- router weights ~ N(0, sqrt(0.1 / d_model)) (Switch's reduced scale 0.1 on a fan-in
  variance), so initial routing is close to uniform and logits start near zero;
- RMSNorm weights = 1, biases = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import phases
from ..config import ModelConfig
from ..moe import MoE, MoEStats
from ..phases import phase
from .blocks import Attention, RMSNorm, SwiGLU, rope_cache
from .cache import KVCache


@dataclass
class ModelOutput:
    """What the model returns: logits (B, S, V) - from a pipeline stage before the last (a part without the final norm
    and head), the activations (B, S, D) it passes on; with targets also loss (LM + mean aux), lm_loss and aux_loss;
    moe_stats, one MoEStats per MoE layer (of this part), in layer order."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + mean over MoE layers of their aux loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in order


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)), the FFN dense SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.layer_idx = layer_idx
        self.ffn: MoE | SwiGLU = MoE(cfg.moe) if cfg.moe is not None and self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        """(B, S, D) -> ((B, S, D), MoEStats or None); `mask` (B, S) marks real tokens; `cache` is read and
        extended when decoding."""
        with phases.layer(self.layer_idx):
            return self._forward(x, cos, sin, mask, cache)

    def _forward(self, x, cos, sin, mask, cache):
        with phase("norm"):
            h = self.attn_norm(x)
        with phase("attention"):
            x = x + self.attn(h, cos, sin, cache=cache, layer=self.layer_idx)
        with phase("norm"):
            h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(h, mask, stats=cache is None)  # marks its own phases; decoding needs no stats
            with phase("combine"):  # the dense FFN's residual add is in "ffn": the same work here
                return x + y, stats
        with phase("ffn"):
            return x + self.ffn(h), None


class Blocks(nn.ModuleDict):
    """The decoder blocks under their layer index (`layers.5.attn.wq.weight` in any part of the model), iterated and
    indexed as blocks: a pipeline stage holds some of them and keeps the whole model's names."""

    def __iter__(self) -> Iterator[Block]:  # type: ignore[override]
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, index: int | str) -> Block:
        return self._modules[str(index)]  # type: ignore[return-value]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with a target (-100 = none), in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def compile_block(block: Block) -> None:
    """`train.compile`: torch.compile what compiles. A dense block whole; in an MoE block
    the attention only: routing has data-dependent shapes (a graph break per layer) and
    grouped_mm has no fp32 fake-tensor kernel, so the MoE layer stays eager."""
    if isinstance(block.ffn, MoE):
        block.attn.compile()
    else:
        block.compile()


_Part = TypeVar("_Part", bound="Transformer")


class Transformer(nn.Module):
    """`out = model(tokens, targets, mask)`: tokens (B, S) int64. targets (B, S) use -100
    for positions without loss. mask (B, S) bool marks real tokens (False = padding) so
    padding is not routed; attention stays causal.

    A part of the model (`part`: a pipeline stage) holds some of the blocks and may lack the embedding (it then takes
    activations (B, S, D) for tokens) or the final norm and head (it returns its activations in `logits`' place)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = Blocks({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight as the module docstring lists."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.layers:
            a = layer.attn
            for lin in (a.wq, a.wk, a.wv):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    lin.bias.zero_()
            nn.init.normal_(a.wo.weight, std=out_std)
            layer.ffn.reset_parameters(std, out_std)

    def part(self, layers: Iterable[int], first: bool, last: bool, cls: type[_Part] | None = None) -> _Part:
        """This model with only the blocks `layers`, the embedding if `first`, the final norm and head if `last` - the
        modules shared, not copied, under the whole model's names (a pipeline stage, or what a pipeline rank holds).
        `cls`: a subclass of Transformer to make it (its own attributes are the caller's to set)."""
        part = (cls or type(self)).__new__(cls or type(self))
        nn.Module.__init__(part)
        part.cfg = self.cfg
        part.embed = self.embed if first else None
        part.layers = Blocks({str(i): self.layers[i] for i in layers})
        part.norm = self.norm if last else None
        part.lm_head = self.lm_head if last else None
        cos, sin = self.rope_cache()
        part.register_buffer("rope_cos", cos, persistent=False)
        part.register_buffer("rope_sin", sin, persistent=False)
        part.activation_checkpointing = self.activation_checkpointing
        return part  # type: ignore[return-value]

    def block_output(self, block: Block, x: torch.Tensor, stats: MoEStats | None) -> torch.Tensor:
        """What leaves `block` for the next one: its activations `x` (a pipeline stage ties the block's aux loss to
        them, since the loss function sees only the last stage)."""
        return x

    def rope_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (max_seq_len, Dh) of the rotary embedding, from position 0."""
        return self.get_buffer("rope_cos"), self.get_buffer("rope_sin")

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection (V, D): lm_head.weight, or the embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.embed is not None, "a part with tied embeddings holds the embedding"
        return self.embed.weight

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in layer order."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """tokens (B, S) int64 -> ModelOutput. With `targets` (B, S; -100 = no loss) the losses are filled in; `mask`
        (B, S) marks real tokens so padding is neither routed nor counted. With `cache` the tokens continue each
        cached sequence (right-padded, `mask` marking the real ones) and the cache grows by them. A part without the
        embedding takes activations (B, S, D) for `tokens`; one without the head returns activations."""
        B, S = tokens.shape[:2]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cache()
        if cache is not None:
            pos_BS = cache.begin(S, self.cfg.max_seq_len, mask).to(tokens.device)
            cos, sin = cos[pos_BS].unsqueeze(1), sin[pos_BS].unsqueeze(1)  # (B, 1, S, Dh)
        x = tokens
        if self.embed is not None:
            with phase("embedding"):
                x = self.embed(tokens)
        stats: list[MoEStats] = []
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x, st = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, st = layer(x, cos, sin, mask, cache)
            if st is not None:
                stats.append(st)
            x = self.block_output(layer, x, st)
        if self.norm is None:  # a pipeline stage before the last
            return ModelOutput(logits=x, moe_stats=stats)
        with phase("norm"):
            x = self.norm(x)
        with phase("head"):
            logits = F.linear(x, self.output_weight)
        out = ModelOutput(logits=logits, moe_stats=stats)
        if cache is not None:
            cache.advance(mask, S)
        if targets is not None:
            with phase("loss"):
                out.lm_loss = lm_loss(logits, targets)
            if stats:
                with phase("aux losses"):
                    out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
            else:
                out.aux_loss = logits.new_zeros((), dtype=torch.float32)
            out.loss = out.lm_loss + out.aux_loss
        return out

    def moe_index(self) -> dict[int, int]:
        """Layer index -> position among the whole model's MoE layers (a part holds some of them)."""
        moe_idx = [i for i in range(self.cfg.n_layers) if self.cfg.moe is not None and self.cfg.is_moe_layer(i)]
        return {i: n for n, i in enumerate(moe_idx)}

    @torch.no_grad()
    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing step: one load vector per MoE layer of the whole model (a part takes its own),
        summed over the optimizer step's micro-batches. Call after `optimizer.step()`."""
        where = self.moe_index()
        if len(tokens_per_expert) != len(where):
            raise ValueError(f"{len(tokens_per_expert)} load vectors for {len(where)} MoE layers")
        for layer in self.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.router.update_bias(tokens_per_expert[where[layer.layer_idx]])

    def num_params(self) -> dict[str, int]:
        """Parameter counts (total, active, non_embedding, ...) from the config; see ModelConfig.param_counts."""
        return self.cfg.param_counts()
