"""One optimizer step: forward/backward over the micro-batches, the gradients finished
(clipped; in a multi-process run scaled and reduced), and the update - skipped when the
loss or gradient norm is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import Sampler
from ..data.loader import rank_slice
from ..parallel.parallelize import all_reduce_floats, all_reduce_loads, finish_gradients
from ..parallel.pipeline import RankStages, pipeline_forward_backward
from ..phases import phase
from ..store import checkpoint as ck
from .evaluate import unpack_batch
from .metrics import MoEWindow
from .setup import Run


@dataclass
class StepResult:
    """What one step did: global loss and LM loss, gradient norm, tokens, expert loads, whether it was applied."""

    loss: float
    lm_loss: float
    grad_norm: float
    tokens: int
    loads: list[torch.Tensor] | None
    finite: bool


def run_step(run: Run, sampler: Sampler, window: MoEWindow, ctx, lr: float) -> StepResult:
    """Forward/backward over grad_accum micro-batches, then the update - unless the loss
    or the gradient norm is not finite, in which case the gradients are dropped and the
    weights stay as they were (the caller stops or skips). In a multi-process run each
    rank takes its slice of the same global batch, and the loss, gradient norm, token
    count and expert loads returned are global (equal on every rank)."""
    tc, model, opt, par = run.cfg.train, run.model, run.opt, run.par
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)  # optim.expert_lr_mult
    if run.schedule is not None:
        return _pipeline_step(run, sampler, window)
    moe_layers = model.moe_layers()
    loads = None
    loss_sum = lm_sum = 0.0
    tokens = 0
    for micro in range(tc.grad_accum):
        with phase("data"):
            idx = sampler.next()
            if par is not None:
                idx = rank_slice(idx, par.rank, par.world)
            x, y, mask = unpack_batch(run.data.train.batch(idx))
            # padding (SFT rows) is not work done: count only real tokens
            tokens += int(mask.sum()) if mask is not None else x.numel()
            x, y = x.to(run.device), y.to(run.device)
            mask = mask.to(run.device) if mask is not None else None
        for moe in moe_layers:
            moe.start_micro_batch(micro)
        with ctx, phase("forward"):
            out = model(x, y, mask)
        with phase("backward"):
            (out.loss / tc.grad_accum).backward()
        loss_sum += out.loss.item() / tc.grad_accum
        lm_sum += out.lm_loss.item() / tc.grad_accum
        window.add(out.moe_stats)
        step_loads = [s.tokens_per_expert for s in out.moe_stats]
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads, strict=True)]
    with phase("optimizer"):
        return _update(run, loss_sum, lm_sum, tokens, loads)


def _pipeline_step(run: Run, sampler: Sampler, window: MoEWindow) -> StepResult:
    """The step under parallel.pipeline: the grad_accum micro-batches one process would
    take in turn go through the schedule together, each data rank of a stage taking its
    share of every micro-batch; every rank ends with the same loss and statistics."""
    M = run.cfg.train.grad_accum
    assert run.par is not None
    D, dp_rank = run.par.layout.data, run.par.layout.dp_rank
    with phase("data"):
        parts = [unpack_batch(run.data.train.batch(rank_slice(sampler.next(), dp_rank, D))) for _ in range(M)]
        mask = None
        if any(p[2] is not None for p in parts):  # SFT rows: every micro-batch padded to the schedule's shape
            parts = [_padded(*p, run.cfg.data.seq_len) for p in parts]
            # padding is neither routed nor counted as work, as in one process
            mask = torch.cat([p[2] for p in parts if p[2] is not None]).to(run.device)
        x = torch.cat([p[0] for p in parts]).to(run.device)
        y = torch.cat([p[1] for p in parts]).to(run.device)
        tokens = float(mask.sum()) if mask is not None else float(x.numel() * D)
    assert isinstance(run.model, RankStages)
    with phase("forward"):  # forward and backward interleave inside the schedule
        loss, lm, per_micro = pipeline_forward_backward(run.model, run.schedule, x, y, M, D, mask)
    loads = None
    for stats in per_micro:
        window.add(stats)
        step_loads = [s.tokens_per_expert for s in stats]
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads, strict=True)]
    if mask is not None:  # real tokens differ between data ranks; each pipeline's ranks hold the same rows
        tokens = all_reduce_floats([tokens], run.par, op="sum")[0] / run.par.layout.pipeline
    with phase("optimizer"):
        return _update(run, loss, lm, int(tokens), loads, pipeline=True)


def _padded(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch right-padded to `length` positions (a pipeline's stages exchange tensors of one shape): padding has
    no target and is masked, so - attention being causal - the real tokens' results are those of the shorter batch."""
    S = x.shape[1]
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    grow = (0, length - S)
    return F.pad(x, grow), F.pad(y, grow, value=-100), F.pad(mask, grow, value=False)


def _update(
    run: Run, loss_sum: float, lm_sum: float, tokens: int, loads: list[torch.Tensor] | None, pipeline: bool = False
) -> StepResult:
    """Finish the gradients (clip; reduce over ranks), apply the update unless the loss or
    the gradient norm is not finite, and reset the gradients."""
    model, opt, par = run.model, run.opt, run.par
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    if par is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    else:
        grad_norm = finish_gradients(model, par, clip)  # the norm sums every rank's shards and stages
    if par is not None and not pipeline:  # a pipeline's loss, tokens and loads are the whole batch's already
        loss_sum, lm_sum, tokens_f = all_reduce_floats([loss_sum, lm_sum, float(tokens)], par, op="sum")
        loss_sum, lm_sum, tokens = loss_sum / par.world, lm_sum / par.world, int(tokens_f)
        # every replica of a router must move its bias the same way: global counts
        loads = all_reduce_loads(loads, par) if loads else loads
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        opt.step()
        if loads:
            model.update_router_biases(loads)
    opt.zero_grad(set_to_none=True)
    return StepResult(loss_sum, lm_sum, grad_norm, tokens, loads, finite)


def nonfinite_message(res: StepResult, step: int, ckpt_root: Path, skipped: int | None = None) -> str:
    """The NonFiniteError text: what was not finite, where the last good checkpoint is, what to change."""
    what = f"loss is {res.loss}" if not math.isfinite(res.loss) else f"gradient norm is {res.grad_norm}"
    last = ck.latest_checkpoint(ckpt_root, warn=False)
    where = (
        f"the last good checkpoint is {last} (weights unchanged since; continue with --resume)"
        if last
        else "no checkpoint has been written yet (the run folder keeps its metrics; start again with --overwrite)"
    )
    lead = (
        f"{what} at step {step}: stopping before the update"
        if skipped is None
        else f"{what} at step {step}, {skipped} steps in a row (train.max_skipped_steps): stopping"
    )
    return (
        f"{lead}; {where}. Lower optim.lr, raise optim.warmup_steps, keep optim.grad_clip on, or enable "
        "the router z-loss (model.moe.z_coef); train.on_nonfinite=skip skips such steps instead"
    )
