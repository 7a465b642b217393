"""The training loop: data -> model -> AdamW, with evaluation, metrics, health checks
and atomic checkpoints. Exact resume: a run stopped with `stop_after` and resumed logs
bitwise the same losses as an uninterrupted one (fp32, same thread count).

Three parts: `_setup` (config, run folder, data, model, optimizer, resume state; it
touches the run folder only once everything it needs has loaded), `_step` (one
optimizer step, guarded against non-finite values before the update) and the loop in
`train` (evaluation, logging, checkpoints).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import Data, Sampler, SamplerState, prepare_data
from ..data.loader import rank_slice
from ..errors import CheckpointError, ConfigError, NonFiniteError, OutputExists
from ..model import Transformer
from ..outputs import check_output
from ..parallel.mesh import Parallel, close_parallel, init_parallel
from ..run_config import RunConfig, read_config, resume_config, save_config
from ..runtime import pick_device, tune_cpu_allocator
from . import checkpoint as ck
from .checkpoint import load_model_weights
from .health import HealthMonitor
from .lr_rule import resolve_auto_lr
from .metrics import MetricsWriter, MoEWindow, TrainingMemory, peak_memory_bytes, truncate_after
from .optim import build_optimizer, lr_at
from .progress import Progress

RunExists = OutputExists  # the older name

__all__ = ["train", "evaluate", "TrainResult", "RunExists", "pick_device", "load_model_weights", "autocast_ctx"]


@dataclass
class TrainResult:
    """What `train` returns: run folder, last step, last validation loss, mean tokens/s of this invocation, parameter
    counts, last expert loads, whether it stopped before the horizon, skipped steps."""

    run_dir: Path
    step: int
    final_val_loss: float | None
    tokens_per_s: float  # mean over this invocation's optimizer steps
    params: dict
    expert_load: list[list[float]]  # last window's load fractions per MoE layer
    stopped_early: bool
    skipped_steps: int = 0


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as run: auto = bf16 on a CUDA device that multiplies bf16 natively
    (compute capability 8.0+, where the experts' grouped_mm runs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp32"


def autocast_ctx(cfg: RunConfig, device: torch.device):
    """bf16 autocast on the device when train.precision is (or auto resolves to) bf16, else a no-op context."""
    if resolve_precision(cfg.train.precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _unpack(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, padding mask or None): packed text has no padding, SFT rows do."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


@torch.no_grad()
def evaluate(model: Transformer, data_val, batch_size: int, n_batches: int, device, ctx, par=None) -> float:
    """Mean next-token loss (nats) over a fixed subset of batch_size x n_batches validation
    sequences spread evenly over the whole split: a prefix would be the first few held-out
    documents only, and rank runs by how they do on those. With `par` (a multi-process
    run) the ranks split each batch and add up their sums: every rank runs the same
    number of forwards (expert parallelism exchanges tokens in each), one with no share
    runs a dummy row that is not counted."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(data_val), batch_size * n_batches)
    chosen = np.unique(np.linspace(0, len(data_val) - 1, n).round().astype(np.int64))
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start : start + batch_size]
        if par is not None:
            idx = np.array_split(idx, par.world)[par.rank]
        weight = 1.0 if len(idx) else 0.0
        x, y, mask = _unpack(data_val.batch((idx if len(idx) else chosen[:1]).tolist()))
        with ctx:
            out = model(x.to(device), y.to(device), mask.to(device) if mask is not None else None)
        n_targets = int((y != -100).sum()) * weight
        total += float(out.lm_loss) * n_targets
        count += int(n_targets)
    if par is not None:
        from ..parallel.parallelize import all_reduce_floats

        total, count_f = all_reduce_floats([total, float(count)], par, op="sum")
        count = int(count_f)
    model.train(was)
    return total / max(count, 1)


@dataclass
class _Run:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    data: Data
    model: Transformer
    opt: torch.optim.Optimizer
    memory: TrainingMemory
    state: dict = field(default_factory=dict)  # trainer state of the checkpoint resumed from
    par: Parallel | None = None  # the layout of a multi-process run

    @property
    def is_main(self) -> bool:
        return self.par is None or self.par.is_main

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def run_data(cfg: RunConfig, tokenizer_path: str | Path | None = None) -> Data:
    """The training and validation data a run config names (source, sequence length, split,
    text field), with `tokenizer_path`'s tokenizer or one trained as the config says."""
    return prepare_data(
        cfg.data.source,
        cfg.data.seq_len,
        cfg.model.vocab_size,
        val_fraction=cfg.data.val_fraction,
        text_field=cfg.data.text_field,
        tokenizer_path=tokenizer_path,
        tokenizer_train_bytes=cfg.data.tokenizer_train_bytes,
    )


def _init_tokenizer(init_ckpt: Path) -> Path:
    """The tokenizer of the run a model is initialised from: its embeddings index those ids."""
    tok = init_ckpt.parent.parent / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(
            f"--init {init_ckpt}: its run folder has no tokenizer.json, so the token ids of its "
            "embeddings are unknown; name the tokenizer to use with data.tokenizer=PATH"
        )
    return tok


def _setup(
    cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, init: str | None, data: Data | None, prepare_model
) -> _Run:
    ckpt_root = run_dir / "checkpoints"
    par = init_parallel(cfg)  # under torchrun; the layout is checked before any collective
    main = par is None or par.is_main
    if cfg.optim.lr == "auto":
        cfg.optim.lr = resolve_auto_lr(cfg)
        rule = f"the fit in {cfg.optim.lr_fit}" if cfg.optim.lr_fit else "MM1's rule over non-embedding parameters"
        if main:
            print(
                f"optim.lr=auto -> {cfg.optim.lr:.4g} ({rule}, N={cfg.model.param_counts()['non_embedding']:,})",
                file=sys.stderr,
            )
    start_ckpt = None
    if resume:
        start_ckpt = ck.latest_checkpoint(ckpt_root, warn=main)
        if start_ckpt is None:
            raise CheckpointError(f"--resume: {run_dir} holds no complete checkpoint to resume from")
        cfg = resume_config(read_config(run_dir / "config.yaml"), cfg, run_dir)
    else:
        check_output(run_dir, overwrite=overwrite, hint="pass --resume to continue it or --overwrite to start over")
    init_ckpt = ck.resolve_checkpoint(init) if init is not None and not resume else None

    device = par.device if par is not None else pick_device(cfg.train.device)
    if device.type == "cpu":
        tune_cpu_allocator()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)  # the same on every rank: each builds the same full model

    tok_file = run_dir / "tokenizer.json"
    if data is None:
        tok_path = tok_file if resume else cfg.data.tokenizer
        if tok_path is None and init_ckpt is not None:
            tok_path = _init_tokenizer(init_ckpt)
        if par is not None and not main:
            par.barrier()  # rank 0 prepares (and caches) the dataset and tokenizer first
        data = run_data(cfg, tok_path)
        if par is not None and main:
            par.barrier()

    memory = TrainingMemory(device)  # before the model: what follows is the training state and step
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if init_ckpt is not None:
        load_model_weights(model, init_ckpt)
    if prepare_model is not None:
        prepare_model(model)
    if par is not None:
        from ..parallel.parallelize import parallelize

        parallelize(model, par, compile_blocks=cfg.train.compile)
    elif cfg.train.compile:
        for block in model.layers:
            block.compile()
    opt = build_optimizer(model, cfg.optim)
    run = _Run(cfg, run_dir, device, data, model, opt, memory, par=par)
    if start_ckpt is not None:
        run.state = ck.check_checkpoint(start_ckpt)
        if par is not None:
            from ..parallel.checkpoint import load_distributed

            load_distributed(start_ckpt, model, opt, par)
        else:
            from ..parallel.state import optimizer_names

            load_model_weights(model, start_ckpt)
            ck.load_optimizer(
                opt, ck.optimizer_state(start_ckpt, optimizer_names(model, opt)), run.state["param_groups"]
            )
        ck.restore_rng(ck.load_tensors(start_ckpt, "rng.safetensors"))
        if main:
            truncate_after(run_dir / "metrics.jsonl", run.state["step"])
    else:  # everything loaded: only now replace (with --overwrite) or create the run folder
        if par is not None:
            par.barrier()  # every rank has checked the folder before rank 0 replaces it
        if main:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            data.tokenizer.save(str(tok_file))
            save_config(cfg, run_dir / "config.yaml")
    if main:
        for stale in ckpt_root.glob(".tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
    if par is not None:
        par.barrier()
    return run


@dataclass
class _StepResult:
    loss: float
    lm_loss: float
    grad_norm: float
    tokens: int
    loads: list[torch.Tensor] | None
    finite: bool


def _step(run: _Run, sampler: Sampler, window: MoEWindow, ctx, lr: float) -> _StepResult:
    """Forward/backward over grad_accum micro-batches, then the update - unless the loss
    or the gradient norm is not finite, in which case the gradients are dropped and the
    weights stay as they were (the caller stops or skips). In a multi-process run each
    rank takes its slice of the same global batch, and the loss, gradient norm, token
    count and expert loads returned are global (equal on every rank)."""
    tc, model, opt, par = run.cfg.train, run.model, run.opt, run.par
    for g in opt.param_groups:
        g["lr"] = lr
    moe_layers = model.moe_layers()
    loads = None
    loss_sum = lm_sum = 0.0
    tokens = 0
    for micro in range(tc.grad_accum):
        idx = sampler.next()
        if par is not None:
            idx = rank_slice(idx, par.rank, par.world)
        x, y, mask = _unpack(run.data.train.batch(idx))
        # padding (SFT rows) is not work done: count only real tokens
        tokens += int(mask.sum()) if mask is not None else x.numel()
        for moe in moe_layers:
            moe.start_micro_batch(micro)
        with ctx:
            out = model(x.to(run.device), y.to(run.device), mask.to(run.device) if mask is not None else None)
        (out.loss / tc.grad_accum).backward()
        loss_sum += out.loss.item() / tc.grad_accum
        lm_sum += out.lm_loss.item() / tc.grad_accum
        window.add(out.moe_stats)
        step_loads = [s.tokens_per_expert for s in out.moe_stats]
        loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads, strict=True)]
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else math.inf
    if par is None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    else:
        from ..parallel.parallelize import all_reduce_floats, all_reduce_loads, finish_gradients

        grad_norm = finish_gradients(model, par, clip)
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
    return _StepResult(loss_sum, lm_sum, grad_norm, tokens, loads, finite)


def _nonfinite_message(res: _StepResult, step: int, ckpt_root: Path, skipped: int | None = None) -> str:
    what = f"loss is {res.loss}" if not math.isfinite(res.loss) else f"gradient norm is {res.grad_norm}"
    last = ck.latest_checkpoint(ckpt_root, warn=False)
    where = (
        f"the last good checkpoint is {last} (weights unchanged since; continue with --resume)"
        if last
        else "no checkpoint has been written yet"
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


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    init: str | None = None,
    quiet: bool = False,
    data: Data | None = None,
    prepare_model=None,
) -> TrainResult:
    """Train `cfg` into `run_dir` and return a TrainResult.

    `resume` continues the run's latest good checkpoint (the command's config must equal
    the saved one except for the RESUMABLE fields); `overwrite` replaces an existing run
    once setup has succeeded; `stop_after` ends this invocation after K steps, with a
    checkpoint; `init` loads weights (and, unless data.tokenizer names one, the tokenizer)
    of another run. `data` replaces the config's text source (fine-tuning passes its own
    examples); `prepare_model(model)` runs after weights are loaded and before the
    optimizer is built (freezing, adapters). Raises ConfigError, CheckpointError,
    OutputExists, or NonFiniteError when a step's loss or gradient is not finite.
    """
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after: expected a positive number of steps, got {stop_after}")
    MetricsWriter.preload()
    run = _setup(cfg, Path(run_dir), resume, overwrite, init, data, prepare_model)
    try:
        return _loop(run, stop_after, quiet)
    finally:
        close_parallel(run.par)


def _loop(run: _Run, stop_after: int | None, quiet: bool) -> TrainResult:
    cfg, tc, state, par = run.cfg, run.cfg.train, run.state, run.par
    step = int(state.get("step", 0))
    sampler = Sampler(len(run.data.train), tc.batch_size, tc.seed, SamplerState(**state.get("sampler", {})))
    health = HealthMonitor(
        tc.spike_factor, tc.spike_window, tc.collapse_max_violation, tc.collapse_window, state.get("health")
    )
    tokens_seen = int(state.get("tokens", 0))
    elapsed = float(state.get("elapsed_s", 0.0))  # training wall-clock, summed over resumes
    skipped_total = int(state.get("skipped_steps", 0))
    end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    metrics = MetricsWriter(run.run_dir) if run.is_main else None  # written once, by rank 0
    window = MoEWindow()
    ctx = autocast_ctx(cfg, run.device)
    val_loss = state.get("val_loss")
    # tokens/s counts optimizer-step time only (evaluation and checkpoints excluded)
    t_window, tok_window, tps = elapsed, 0, 0.0
    start_elapsed, start_tokens = elapsed, tokens_seen
    last_summary: list[dict] = []
    pending: list[str] = []  # warnings waiting for the next metrics line
    skipped_in_row = 0

    def warn(msg: str) -> None:
        if run.is_main:  # the same on every rank: the values behind it are global
            progress.write(f"warning: {msg}")
        pending.append(msg)

    run.model.train()
    progress = Progress(end, step, cfg.name, quiet or not run.is_main)
    try:
        while step < end:
            t_step = time.perf_counter()
            lr = lr_at(step, tc.steps, cfg.optim)
            res = _step(run, sampler, window, ctx, lr)
            run.memory.sample()
            if not res.finite:
                skipped_in_row += 1
                if tc.on_nonfinite == "stop" or skipped_in_row >= tc.max_skipped_steps:
                    raise NonFiniteError(
                        _nonfinite_message(
                            res, step + 1, run.ckpt_root, None if tc.on_nonfinite == "stop" else skipped_in_row
                        )
                    )
                skipped_total += 1
                warn(
                    f"step {step + 1} skipped: loss {res.loss}, gradient norm {res.grad_norm} (train.on_nonfinite=skip)"
                )
            else:
                skipped_in_row = 0
                spike = health.check_loss(step + 1, res.loss)
                if spike:
                    warn(spike)
            step += 1
            elapsed += time.perf_counter() - t_step
            tokens_seen += res.tokens
            tok_window += res.tokens
            progress.update(step)

            evaluated = step % tc.eval_every == 0 or step == tc.steps
            if evaluated:
                val_loss = evaluate(run.model, run.data.val, tc.batch_size, tc.eval_batches, run.device, ctx, par)
            if step % tc.log_every == 0 or step == end or evaluated:
                tps = tok_window / max(elapsed - t_window, 1e-9)
                t_window, tok_window = elapsed, 0
                train_mem = run.memory.peak
                if par is not None:  # statistics of the whole data-parallel batch
                    from ..parallel.parallelize import all_reduce_floats, reduce_window

                    reduce_window(window, par)
                    train_mem = int(all_reduce_floats([float(train_mem)], par, op="max")[0])
                last_summary = window.summary()
                window.reset()
                record = {
                    "step": step,
                    "tokens": tokens_seen,
                    "elapsed_s": elapsed,
                    "loss": res.loss,
                    "lm_loss": res.lm_loss,
                    "lb_loss": _mean([m["lb_loss"] for m in last_summary]),
                    "z_loss": _mean([m["z_loss"] for m in last_summary]),
                    "lr": lr,
                    "grad_norm": res.grad_norm,
                    "tokens_per_s": tps,
                    "peak_mem_bytes": peak_memory_bytes(run.device),
                    "train_mem_bytes": train_mem,
                    "loss_spikes": health.spikes,
                    "skipped_steps": skipped_total,
                    "moe_layers": last_summary,
                }
                if evaluated:
                    record["val_loss"] = val_loss
                for w in health.check_router(step, [m["max_violation"] for m in last_summary]):
                    warn(w)
                if pending:
                    record["warnings"], pending = pending, []
                if metrics is not None:
                    metrics.write(_json_safe(record))
                progress.log(step, res.loss, val_loss, tps)
            if step % tc.ckpt_every == 0 or step == end:
                trainer_state = {
                    "sampler": vars(sampler.state),
                    "health": health.state(),
                    "tokens": tokens_seen,
                    "val_loss": val_loss,
                    "total_steps": tc.steps,
                    "elapsed_s": elapsed,
                    "skipped_steps": skipped_total,
                }
                if par is None:
                    ck.save_checkpoint(run.ckpt_root, step, run.model, run.opt, trainer_state, keep=tc.keep_checkpoints)
                else:
                    from ..parallel.checkpoint import save_distributed

                    save_distributed(
                        run.ckpt_root, step, run.model, run.opt, trainer_state, par, keep=tc.keep_checkpoints
                    )
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    mean_tps = (tokens_seen - start_tokens) / max(elapsed - start_elapsed, 1e-9)
    return TrainResult(
        run.run_dir,
        step,
        val_loss,
        mean_tps,
        cfg.model.param_counts(),
        [m["load"] for m in last_summary],
        stopped_early=step < tc.steps,
        skipped_steps=skipped_total,
    )


def _json_safe(record: dict) -> dict:
    """NaN/inf (a skipped step's loss) as strings: metrics.jsonl stays strict JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
