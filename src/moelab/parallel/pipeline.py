"""Pipeline stages of a Transformer for `torch.distributed.pipelining`, and the MoE's
auxiliary losses carried through a pipeline's backward pass.

A stage holds a contiguous run of decoder blocks - the embedding with the first, the
final norm and the head with the last - under their names in the whole model
(`layers.5.attn.wq.weight` stays that), so checkpoints and FSDP/EP plans see the same
names in any layout.

The pitfall this module exists for: a pipeline's schedule calls the loss function on the
last stage only, so the balance and z losses of MoE layers on earlier stages never reach
a loss that is backpropagated - they are silently dropped. `attach_aux` ties each
layer's aux loss to the activations that leave its block: the forward passes the
activations through unchanged, the backward hands the aux loss a gradient of `weight`
(its share in the total loss) beside the activations' own, so every stage's routers get
exactly the gradient they get in one process (Megatron-Core's MoEAuxLossAutoScaler does
the same). The schedule's 1/M averaging over micro-batches then applies to both alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model import Transformer


class _AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight, ctx.aux_shape = weight, aux.shape
        ctx.aux_meta = (aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full(ctx.aux_shape, ctx.weight, dtype=dtype, device=device), None


def attach_aux(x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
    """x unchanged; in the backward, `aux` (a scalar in the graph) receives gradient `weight`."""
    return _AttachAux.apply(x, aux, weight)


def split_layers(n_layers: int, stages: int, points: list[int] | None = None) -> list[range]:
    """The decoder blocks of each stage: at `points` (the first block of stages 1..P-1), or
    as even as the layer count allows (earlier stages take the remainder: the last stage
    also holds the head). ConfigError when a stage would be empty."""
    if points is None:
        base, extra = divmod(n_layers, stages)
        sizes = [base + (1 if s < extra else 0) for s in range(stages)]
        points = [sum(sizes[: s + 1]) for s in range(stages - 1)]
    bounds = [0, *points, n_layers]
    if len(bounds) != stages + 1 or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        raise ConfigError(
            f"parallel.pipeline={stages}: cannot split {n_layers} layers at {points} into {stages} non-empty stages"
        )
    return [range(b, c) for b, c in zip(bounds, bounds[1:], strict=False)]


class Stage(nn.Module):
    """Blocks `layers` of `model` (shared, not copied), with the embedding if first and the
    final norm and head if last. forward: tokens (first) or hidden states -> hidden
    states, or logits (last). Each MoE layer's aux loss is attached to the activations
    with weight 1 / (MoE layers in the whole model): the model's aux loss is their mean."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        super().__init__()
        if model.cfg.tie_embeddings and not (first and last):
            # the head would train a copy of the first stage's embedding that nothing syncs back
            raise ConfigError(
                "parallel.pipeline > 1 needs model.tie_embeddings=false (the embedding and the head "
                "live on different stages)"
            )
        self.first, self.last, self.cfg = first, last, model.cfg
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.output_weight = (lambda: model.output_weight) if last else None
        cos, sin = model.rope_cos, model.rope_sin
        assert isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_weight = 1.0 / max(1, len(model.moe_layers()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens on the first stage, (B, S, D) activations after; (B, S, V) logits from the last."""
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x, st = layer(x, self.rope_cos, self.rope_sin)
            if st is not None and torch.is_grad_enabled():
                x = attach_aux(x, st.aux_loss, self.aux_weight)
        if self.norm is not None:
            assert self.output_weight is not None
            x = F.linear(self.norm(x), self.output_weight())
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss of one micro-batch: mean next-token cross-entropy (targets -100 = none)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def stages_of(model: Transformer, stages: int, points: list[int] | None = None) -> list[Stage]:
    """The model as `stages` pipeline stages (for one process to inspect; a rank builds only its own)."""
    parts = split_layers(model.cfg.n_layers, stages, points)
    return [Stage(model, r, s == 0, s == stages - 1) for s, r in enumerate(parts)]
