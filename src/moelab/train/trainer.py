"""The training loop: data -> model -> optimizer (AdamW or Muon), with evaluation, metrics, health checks
and atomic checkpoints. Exact resume: a run stopped with `stop_after` and resumed logs
bitwise the same losses as an uninterrupted one (fp32, same thread count).

Three parts, one path for one process and for many: `setup.setup` (config, layout, run
folder, data, model, optimizer, resume state), `step.step` (one optimizer step, guarded
against non-finite values before the update) and the loop here (evaluation, logging,
checkpoints).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import Data, Sampler, SamplerState
from ..errors import ConfigError, NonFiniteError, OutputExists
from ..parallel.checkpoint import save_distributed
from ..parallel.mesh import close_parallel, init_parallel
from ..parallel.parallelize import all_reduce_floats, reduce_window
from ..run_config import RunConfig
from ..runtime import machine_name
from ..store import checkpoint as ck
from ..store.outputs import restore
from .evaluate import evaluate, evaluate_pipeline
from .health import HealthMonitor
from .metrics import MetricsWriter, MoEWindow, peak_memory_bytes
from .optim import lr_at
from .progress import Progress
from .setup import Run, autocast_ctx, setup
from .step import nonfinite_message, run_step

RunExists = OutputExists  # the older name


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
    ran: int = 0  # optimizer steps this invocation took (0: a resumed run already at its length)


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
    protect: Sequence[str | Path | None] = (),
    records: dict[str, dict] | None = None,
) -> TrainResult:
    """Train `cfg` into `run_dir` and return a TrainResult.

    `resume` continues the run's latest good checkpoint (the command's config must equal
    the saved one except for the RESUMABLE fields); `overwrite` replaces an existing run
    once setup has succeeded; `stop_after` ends this invocation after K steps, with a
    checkpoint; `init` loads weights (and, unless data.tokenizer names one, the tokenizer)
    of another run. `data` replaces the config's text source (fine-tuning passes its own
    examples); `prepare_model(model)` runs after weights are loaded and before the
    optimizer is built (freezing, adapters). `protect` names further inputs the run folder
    must stay clear of; `records` are JSON files written beside config.yaml. Raises ConfigError, CheckpointError,
    OutputExists, or NonFiniteError when a step's loss or gradient is not finite.
    """
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after: expected a positive number of steps, got {stop_after}")
    MetricsWriter.preload()
    par = init_parallel(cfg)  # under torchrun; the layout is checked before any collective
    try:
        run = setup(cfg, Path(run_dir), resume, overwrite, init, data, prepare_model, par, protect, records)
        try:
            return _loop(run, stop_after, quiet)
        except BaseException as e:
            _undo_new_folder(run, e)
            raise
    finally:
        close_parallel(par)


def _undo_new_folder(run: Run, e: BaseException) -> None:
    """A new run that failed before its first checkpoint cannot be resumed: remove its
    folder and bring back the one it replaced. A diverged run that replaced nothing keeps
    its folder: its metrics are the diagnosis."""
    if not (run.is_main and run.new_folder):
        return
    if isinstance(e, NonFiniteError) and run.replaced is None:
        return
    restore(run.run_dir, run.replaced)
    run.new_folder, run.replaced = False, None


def _first_checkpoint_written(run: Run) -> None:
    """The new run can be resumed now: the folder it replaced goes."""
    if run.is_main and run.new_folder:
        if run.replaced is not None:
            shutil.rmtree(run.replaced, ignore_errors=True)
        run.new_folder, run.replaced = False, None


@dataclass
class _Tally:
    """What the loop counts and a checkpoint carries over to a resumed run."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training wall-clock (optimizer steps only), summed over resumes
    skipped: int = 0
    val_loss: float | None = None
    eval_s: float = 0.0  # held-out evaluation and checkpoint writing, kept apart from training seconds
    ckpt_s: float = 0.0

    @classmethod
    def resumed(cls, state: dict) -> _Tally:
        return cls(
            int(state.get("step", 0)),
            int(state.get("tokens", 0)),
            float(state.get("elapsed_s", 0.0)),
            int(state.get("skipped_steps", 0)),
            state.get("val_loss"),
            float(state.get("eval_s", 0.0)),
            float(state.get("ckpt_s", 0.0)),
        )


def _loop(run: Run, stop_after: int | None, quiet: bool) -> TrainResult:
    cfg, tc, state, par = run.cfg, run.cfg.train, run.state, run.par
    t = _Tally.resumed(state)
    if t.step > tc.steps:  # --steps is the run's length: a smaller one would end the run "finished" having done nothing
        raise ConfigError(
            f"train.steps={tc.steps} (--steps): the run is already at step {t.step}; --steps is the run's total "
            "length, not steps to add"
        )
    first = t.step
    sampler = Sampler(len(run.data.train), tc.batch_size, tc.seed, SamplerState(**state.get("sampler", {})))
    health = HealthMonitor(
        tc.spike_factor, tc.spike_window, tc.collapse_max_violation, tc.collapse_window, state.get("health")
    )
    end = tc.steps if stop_after is None else min(tc.steps, t.step + stop_after)
    metrics = MetricsWriter(run.run_dir) if run.is_main else None  # written once, by rank 0
    window = MoEWindow()
    ctx = autocast_ctx(cfg, run.device)
    machine = machine_name(run.device)  # whose seconds these are: compare says so beside any figure on the clock
    # tokens/s counts optimizer-step time only (evaluation and checkpoints excluded)
    t_window, tok_window = t.elapsed, 0
    start = (t.elapsed, t.tokens)
    last_summary: list[dict] = []
    pending: list[str] = []  # warnings waiting for the next metrics line
    skipped_in_row = 0

    def warn(msg: str) -> None:
        if run.is_main:  # the same on every rank: the values behind it are global
            progress.write(f"warning: {msg}")
        pending.append(msg)

    run.model.train()
    progress = Progress(end, t.step, cfg.name, quiet or not run.is_main)
    try:
        while t.step < end:
            t_step = time.perf_counter()
            lr = lr_at(t.step, tc.steps, cfg.optim)
            res = run_step(run, sampler, window, ctx, lr)
            run.memory.sample()
            skipped_in_row = _judge(run, res, t.step + 1, skipped_in_row, health, warn)
            t.skipped += 0 if res.finite else 1
            t.step += 1
            t.elapsed += time.perf_counter() - t_step
            t.tokens += res.tokens
            tok_window += res.tokens
            progress.update(t.step)

            evaluated = t.step % tc.eval_every == 0 or t.step == tc.steps
            if evaluated:
                t_eval = time.perf_counter()
                if run.schedule is not None:
                    t.val_loss = evaluate_pipeline(run, ctx)
                else:
                    t.val_loss = evaluate(run.model, run.data.val, tc.batch_size, tc.eval_batches, run.device, ctx, par)
                t.eval_s += time.perf_counter() - t_eval
            if t.step % tc.log_every == 0 or t.step == end or evaluated:
                tps = tok_window / max(t.elapsed - t_window, 1e-9)
                t_window, tok_window = t.elapsed, 0
                last_summary, record = _record(run, window, t, res, lr, tps, health)
                record["machine"] = machine
                if evaluated:
                    record["val_loss"] = t.val_loss
                for w in health.check_router(t.step, [m["max_violation"] for m in last_summary]):
                    warn(w)
                if pending:
                    record["warnings"], pending = pending, []
                if metrics is not None:
                    metrics.write(_json_safe(record))
                progress.log(t.step, res.loss, t.val_loss, tps)
            if t.step % tc.ckpt_every == 0 or t.step == end:
                t_ckpt = time.perf_counter()
                _save(run, t, sampler, health)
                t.ckpt_s += time.perf_counter() - t_ckpt
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    mean_tps = (t.tokens - start[1]) / max(t.elapsed - start[0], 1e-9)
    return TrainResult(
        run.run_dir,
        t.step,
        t.val_loss,
        mean_tps,
        cfg.model.param_counts(),
        [m["load"] for m in last_summary],
        stopped_early=t.step < tc.steps,
        skipped_steps=t.skipped,
        ran=t.step - first,
    )


def _judge(run: Run, res, step: int, skipped_in_row: int, health: HealthMonitor, warn) -> int:
    """A finite step is watched for a loss spike; a non-finite one stops the run, or with
    train.on_nonfinite=skip is skipped, up to max_skipped_steps in a row. Returns the new
    count of steps skipped in a row."""
    tc = run.cfg.train
    if res.finite:
        if spike := health.check_loss(step, res.loss):
            warn(spike)
        return 0
    if tc.on_nonfinite == "stop" or skipped_in_row + 1 >= tc.max_skipped_steps:
        limit = None if tc.on_nonfinite == "stop" else skipped_in_row + 1
        raise NonFiniteError(nonfinite_message(res, step, run.ckpt_root, limit))
    warn(f"step {step} skipped: loss {res.loss}, gradient norm {res.grad_norm} (train.on_nonfinite=skip)")
    return skipped_in_row + 1


def _record(run: Run, window: MoEWindow, t: _Tally, res, lr: float, tps: float, health) -> tuple[list[dict], dict]:
    """The MoE layers' summary of the window since the last line (reset here) and the
    metrics line of step `t.step`; in a multi-process run both are the global batch's."""
    train_mem = run.memory.peak
    if run.par is not None:  # statistics of the whole data-parallel batch
        if run.schedule is None:  # a pipeline's are the whole batch's already, on every rank
            reduce_window(window, run.par)
        train_mem = int(all_reduce_floats([float(train_mem)], run.par, op="max")[0])
    summary = window.summary()
    window.reset()
    return summary, {
        "step": t.step,
        "tokens": t.tokens,
        "elapsed_s": t.elapsed,
        "eval_s": t.eval_s,
        "ckpt_s": t.ckpt_s,
        "loss": res.loss,
        "lm_loss": res.lm_loss,
        "lb_loss": _mean([m["lb_loss"] for m in summary]),
        "z_loss": _mean([m["z_loss"] for m in summary]),
        "lr": lr,
        "grad_norm": res.grad_norm,
        "tokens_per_s": tps,
        "peak_mem_bytes": peak_memory_bytes(run.device),
        "train_mem_bytes": train_mem,
        "loss_spikes": health.spikes,
        "skipped_steps": t.skipped,
        "moe_layers": summary,
    }


def _save(run: Run, t: _Tally, sampler: Sampler, health: HealthMonitor) -> None:
    """Checkpoint step `t.step` (with everything an exact resume needs), in either form."""
    tc = run.cfg.train
    trainer_state = {
        "sampler": vars(sampler.state),
        "health": health.state(),
        "tokens": t.tokens,
        "val_loss": t.val_loss,
        "total_steps": tc.steps,
        "elapsed_s": t.elapsed,
        "eval_s": t.eval_s,
        "ckpt_s": t.ckpt_s,
        "skipped_steps": t.skipped,
    }
    if run.par is None:
        ck.save_checkpoint(run.ckpt_root, t.step, run.model, run.opt, trainer_state, keep=tc.keep_checkpoints)
    else:
        save_distributed(
            run.ckpt_root, t.step, run.model, run.opt, trainer_state, run.par, keep=tc.keep_checkpoints,
            groups=run.full_groups,
        )  # fmt: skip
    _first_checkpoint_written(run)


def _json_safe(record: dict) -> dict:
    """NaN/inf (a skipped step's loss) as strings: metrics.jsonl stays strict JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
