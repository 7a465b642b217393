"""Pipeline stages of a Transformer for `torch.distributed.pipelining`, and the MoE's
auxiliary losses carried through a pipeline's backward pass.

A stage is the model with the other stages' layers removed (`Transformer.part`): a
contiguous run of decoder blocks - the embedding with the first, the final norm and the
head with the last - under their names in the whole model (`layers.5.attn.wq.weight`
stays that), so checkpoints and FSDP/EP plans see the same names in any layout, and the
stage runs the model's own forward (padding masks, activation checkpointing, the loss).

The pitfall this module exists for: a pipeline's schedule calls the loss function on the
last stage only, so the balance and z losses of MoE layers on earlier stages never reach
a loss that is backpropagated - they are silently dropped. `attach_aux` ties each
layer's aux loss to the activations that leave its block: the forward passes the
activations through unchanged, the backward hands the aux loss a gradient of `weight`
(its share in the total loss) beside the activations' own, so every stage's routers get
exactly the gradient they get in one process (Megatron-Core's MoEAuxLossAutoScaler does
the same). The schedule's 1/M averaging over micro-batches then applies to both alike.

What a pipeline rank of `moelab train` runs: `build_rank` (its stages, as one module
under the model's names), `build_schedule` (shapes given, so no shape-finding forward
counts as a micro-batch), `pipeline_forward_backward` (one step; losses and MoE
statistics summed over the ranks so every rank logs and decides alike) and
`pipeline_loss_sum` (evaluation, stage by stage, point to point).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..model import Transformer
from ..model.transformer import lm_loss
from ..moe import MoEStats
from ..run_config import Schedule

# parallel.pipeline_schedule -> torch.distributed.pipelining's schedule class
SCHEDULES: dict[Schedule, str] = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "looped_bfs": "ScheduleLoopedBFS",
    "interleaved_zb": "ScheduleInterleavedZeroBubble",
}


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
    given = points is not None
    if points is None:
        base, extra = divmod(n_layers, stages)
        sizes = [base + (1 if s < extra else 0) for s in range(stages)]
        points = [sum(sizes[: s + 1]) for s in range(stages - 1)]
    bounds = [0, *points, n_layers]
    if len(bounds) != stages + 1 or any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        field = "parallel.pipeline_split" if given else "parallel.pipeline x virtual_stages"
        raise ConfigError(
            f"{field}: cannot split {n_layers} layers at {points} into {stages} non-empty stages "
            f"(expected {stages - 1} increasing layer indices, each the first layer of a stage after the first)"
        )
    return [range(b, c) for b, c in zip(bounds, bounds[1:], strict=False)]


class Stage(Transformer):
    """One pipeline stage: the model with the other stages' layers removed (`Transformer.part`, the modules shared,
    under the whole model's names), run by torch's PipelineStage. Its forward takes tokens (first stage) or
    activations and returns activations, or logits (last); it counts the step's micro-batches (global balancing and
    the padding mask are per micro-batch), gives each its rows' padding mask (`masks`, set for the step: the schedule
    passes a stage its input tensor only) and ties each MoE layer's aux loss to the activations with weight
    1 / (MoE layers in the whole model): the model's aux loss is their mean."""

    first: bool
    last: bool
    aux_weight: float
    micro: int  # micro-batches this stage has run in the current step
    masks: list[torch.Tensor] | None  # each micro-batch's padding mask (B, S), or None: no padding
    record: list | None  # (layer index, micro-batch, MoEStats) while a step records

    @classmethod
    def cut(cls, model: Transformer, layers: range, first: bool, last: bool) -> Stage:
        """Stage holding blocks `layers` of `model`, the embedding if `first`, the final norm and head if `last`."""
        if model.cfg.tie_embeddings and not (first and last):
            # the head would train a copy of the first stage's embedding that nothing syncs back
            raise ConfigError(
                "parallel.pipeline > 1 needs model.tie_embeddings=false (the embedding and the head "
                "live on different stages)"
            )
        st = model.part(layers, first, last, cls=cls)
        st.first, st.last = first, last
        st.aux_weight = 1.0 / max(1, len(model.moe_layers()))
        st.micro, st.masks, st.record = 0, None, None
        return st

    def block_output(self, block, x: torch.Tensor, stats: MoEStats | None) -> torch.Tensor:
        """x, with the block's aux loss attached when gradients flow; the block's statistics recorded."""
        if stats is None:
            return x
        if self.record is not None:
            self.record.append((block.layer_idx, self.micro, stats))
        return attach_aux(x, stats.aux_loss, self.aux_weight) if torch.is_grad_enabled() else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, S) tokens on the first stage, (B, S, D) activations after; (B, S, V) logits from the last."""
        for moe in self.moe_layers():
            moe.start_micro_batch(self.micro)  # global balancing counts over the step's micro-batches
        mask = self.masks[self.micro] if self.masks is not None else None
        y = super().forward(x, mask=mask).logits
        self.micro += 1
        if y._is_view():  # attach_aux's output: zero-bubble schedules detach_() stage outputs, which a view refuses
            y = y.clone()
        return y


def stages_of(model: Transformer, stages: int, points: list[int] | None = None) -> list[Stage]:
    """The model as `stages` pipeline stages (for one process to inspect; a rank builds only its own)."""
    parts = split_layers(model.cfg.n_layers, stages, points)
    return [Stage.cut(model, r, s == 0, s == stages - 1) for s, r in enumerate(parts)]


class RankStages(Transformer):
    """What one pipeline rank holds - its stages' blocks, the embedding and head where its
    stages have them - as one part of the model under the whole model's names (so the optimizer,
    checkpoints, `training_state` and the router updates treat it like the model), and the stages themselves
    (`stages`, not registered twice) for the schedule."""

    stages: list[Stage]
    indices: list[int]
    n_stages: int

    def set_masks(self, mask: torch.Tensor | None, micro: int) -> None:
        """The step's padding mask (micro x B, S) for every stage, cut into its `micro` micro-batches."""
        for st in self.stages:
            st.masks = None if mask is None else list(mask.chunk(micro))


def build_rank(
    model: Transformer, pipeline: int, virtual: int, rank: int, points: list[int] | None = None
) -> RankStages:
    """The stages pipeline rank `rank` holds (stage s lives on rank s mod P: the looped
    placement the multi-stage schedules expect), cut from `model` (identical on every rank)
    at `points` (parallel.pipeline_split) or evenly."""
    S = pipeline * virtual
    parts = split_layers(model.cfg.n_layers, S, points)
    idx = [s for s in range(S) if s % pipeline == rank]
    stages = [Stage.cut(model, parts[s], s == 0, s == S - 1) for s in idx]
    rs = model.part([i for s in idx for i in parts[s]], 0 in idx, S - 1 in idx, cls=RankStages)
    rs.stages, rs.indices, rs.n_stages = stages, idx, S  # a plain list: the modules are registered once, above
    return rs


def build_schedule(
    rank_stages: RankStages,
    kind: Schedule,
    micro_batches: int,
    micro_shape: tuple[int, int],
    device,
    logits_dtype=None,
    group: dist.ProcessGroup | None = None,
):
    """The torch.distributed.pipelining schedule that runs `rank_stages` over `micro_batches`
    micro-batches of `micro_shape` (B, S) tokens (this rank's share), between the ranks of
    `group` (this rank's pipeline; None = the world). Each stage's input and output shapes
    are given, so no shape-finding forward runs (it would count as a micro-batch)."""
    from torch.distributed.pipelining import PipelineStage, schedules

    B, S = micro_shape
    cfg = rank_stages.cfg

    def meta(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    pipe: list = [
        PipelineStage(
            st,
            i,
            rank_stages.n_stages,
            device,
            # activations in and out carry gradients: without the flag none is sent back
            input_args=meta(B, S, dtype=torch.long) if st.first else meta(B, S, cfg.d_model).requires_grad_(),
            output_args=meta(B, S, cfg.vocab_size, dtype=logits_dtype or torch.float32).requires_grad_()
            if st.last
            else meta(B, S, cfg.d_model).requires_grad_(),
            group=group,
        )
        for st, i in zip(rank_stages.stages, rank_stages.indices, strict=True)
    ]
    name = SCHEDULES[kind]
    cls = getattr(schedules, name, None)
    if cls is None:
        raise ConfigError(f"parallel.pipeline_schedule={kind}: this torch ({torch.__version__}) has no {name}")
    if kind in ("1f1b", "gpipe"):
        return cls(pipe[0], micro_batches, loss_fn=lm_loss)
    return cls(pipe, micro_batches, loss_fn=lm_loss)


@torch.no_grad()
def _gather(
    rank_stages: RankStages, micro: int, lm: list[float], device, data: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's per-micro-batch MoE statistics (M, L, 6 + E; MoEStats.pack's rows) and LM
    losses (M,) of the whole batch: summed over the pipeline ranks (each layer and the head
    live on exactly one), expert loads summed and the rest averaged over the `data` ranks of
    each stage."""
    where = rank_stages.moe_index()
    E = rank_stages.cfg.moe.n_experts if rank_stages.cfg.moe is not None else 0
    n = len(MoEStats.SCALARS)
    stats = torch.zeros(micro, len(where), n + E, dtype=torch.float64, device=device)
    for st in rank_stages.stages:
        for layer_idx, m, s in st.record or []:
            stats[m, where[layer_idx]] = s.pack()
    losses = torch.zeros(micro, dtype=torch.float64, device=device)
    if lm:
        losses += torch.tensor(lm, dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    dist.all_reduce(losses)
    stats[:, :, :n] /= data  # per-layer means of equal shares of the batch
    return stats, losses / data


def step_schedule(schedule, *args, **kwargs) -> None:
    """schedule.step without keeping the last stage's outputs: torch keeps every
    micro-batch's logits to return them merged (M x tokens x vocab floats on the last
    rank until the next step) unless told not to (`return_outputs`, torch >= 2.8)."""
    if "return_outputs" in inspect.signature(schedule.step).parameters:
        kwargs["return_outputs"] = False
    schedule.step(*args, **kwargs)


def pipeline_forward_backward(
    rank_stages: RankStages,
    schedule,
    x: torch.Tensor,
    y: torch.Tensor,
    micro: int,
    data: int = 1,
    mask: torch.Tensor | None = None,
):
    """One step's forward and backward through the pipeline over `micro` micro-batches of
    (x, y) and their padding `mask` (every rank of a pipeline passes the same rows: its data
    rank's share of the batch, of `data` equal shares). Returns (loss, lm loss) means over
    the micro-batches and, per micro-batch, the MoEStats of every MoE layer of the model, of
    the whole batch - the same on every rank."""
    rank_stages.set_masks(mask, micro)
    for st in rank_stages.stages:
        st.micro, st.record = 0, []
    losses: list[torch.Tensor] = []
    first = any(st.first for st in rank_stages.stages)
    last = any(st.last for st in rank_stages.stages)
    kw = {"target": y, "losses": losses} if last else {}
    step_schedule(schedule, *((x,) if first else ()), **kw)
    stats, lm = _gather(rank_stages, micro, [float(v.detach()) for v in losses], x.device, data)
    rank_stages.set_masks(None, micro)
    for st in rank_stages.stages:
        st.record = None
    per_micro = [[MoEStats.unpack(row) for row in stats[m]] for m in range(micro)]
    aux_col = MoEStats.SCALARS.index("aux_loss")
    aux = stats[:, :, aux_col].mean(1) if stats.shape[1] else torch.zeros(micro, dtype=torch.float64)
    return float((lm + aux).mean()), float(lm.mean()), per_micro


@torch.no_grad()
def pipeline_loss_sum(
    rank_stages: RankStages,
    x: torch.Tensor,
    y: torch.Tensor,
    pipeline: int,
    group: dist.ProcessGroup | None = None,
    counted: bool = True,
    mask: torch.Tensor | None = None,
) -> tuple[float, int]:
    """(sum of next-token losses, targets) of one batch (and its padding `mask`) through the
    pipeline without a schedule - each stage in order, activations sent to the rank of the
    next in `group` (this rank's pipeline; None = the world) - summed over every pipeline
    (each passes its own rows; `counted=False`: a placeholder row that keeps collectives in
    step) and the same on every rank. For evaluation."""
    rank_stages.set_masks(mask, 1)
    for st in rank_stages.stages:
        st.micro = 0
    me = dist.get_rank(group)
    mine = dict(zip(rank_stages.indices, rank_stages.stages, strict=True))

    def peer(pp_rank: int) -> int:
        return pp_rank if group is None else dist.get_global_rank(group, pp_rank)

    h = None
    for s in range(rank_stages.n_stages):
        owner, nxt = s % pipeline, (s + 1) % pipeline
        if owner == me:
            h = mine[s](x if s == 0 else h)
            if s + 1 < rank_stages.n_stages and nxt != me:
                dist.send(h.contiguous(), dst=peer(nxt))
        elif nxt == me and s + 1 < rank_stages.n_stages:
            cfg = rank_stages.cfg
            h = torch.empty(x.shape[0], x.shape[1], cfg.d_model, dtype=torch.float32, device=x.device)
            dist.recv(h, src=peer(owner))
    rank_stages.set_masks(None, 1)
    out = torch.zeros(2, dtype=torch.float64, device=x.device)
    if (rank_stages.n_stages - 1) % pipeline == me and counted:
        assert h is not None
        n = int((y != -100).sum())
        out[0], out[1] = float(lm_loss(h, y)) * n, n
    dist.all_reduce(out)
    return float(out[0]), int(out[1])
