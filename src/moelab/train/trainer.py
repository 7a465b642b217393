"""The training loop: data -> model -> AdamW, with evaluation, metrics, health checks
and atomic checkpoints. Exact resume: a run stopped with `stop_after` and resumed logs
bitwise the same losses as an uninterrupted one (fp32, same thread count)."""
from __future__ import annotations

import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import Data, Sampler, SamplerState, prepare_data
from ..model import Transformer
from ..run_config import RunConfig, read_config, save_config
from ..runtime import tune_cpu_allocator
from . import checkpoint as ck
from .health import HealthMonitor
from .metrics import MetricsWriter, MoEWindow, peak_memory_bytes, truncate_after
from .optim import build_optimizer, lr_at


class RunExists(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    tokens_per_s: float  # mean over this invocation's optimizer steps
    params: dict
    expert_load: list[list[float]]  # last window's load fractions per MoE layer
    stopped_early: bool


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_ctx(cfg: RunConfig, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, data_val, batch_size: int, n_batches: int, device, ctx) -> float:
    """Mean next-token loss (nats) over a fixed prefix of the validation sequences."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(data_val), batch_size * n_batches)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        x, y, *mask = data_val.batch(idx)
        with ctx:
            out = model(x.to(device), y.to(device), mask[0].to(device) if mask else None)
        n_targets = int((y != -100).sum())
        total += float(out.lm_loss) * n_targets
        count += n_targets
    model.train(was)
    return total / max(count, 1)


def load_model_weights(model: Transformer, ckpt: Path) -> None:
    tensors = ck.load_tensors(ckpt, "model.safetensors")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ck.CheckpointError(f"checkpoint {ckpt} does not fit this model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, init: str | None = None, quiet: bool = False,
          data: Data | None = None, prepare_model=None) -> TrainResult:
    """Train `cfg` into `run_dir`. `data` replaces the config's text source (fine-tuning
    passes its own examples); `prepare_model(model)` runs after weights are loaded and
    before the optimizer is built (freezing, adapters)."""
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    start_ckpt = None
    if resume:
        start_ckpt = ck.latest_checkpoint(ckpt_root)
        if start_ckpt is None:
            raise ck.CheckpointError(f"--resume: {run_dir} holds no complete checkpoint to resume from")
        steps = cfg.train.steps
        cfg = read_config(run_dir / "config.yaml")
        cfg.train.steps = steps
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExists(f"run folder {run_dir} already exists: pass --resume to continue it "
                            "or --overwrite to start over")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)

    if cfg.optim.lr == "auto":
        from ..analysis.lr_scaling import resolve_auto_lr
        cfg.optim.lr = resolve_auto_lr(cfg)
        rule = f"the fit in {cfg.optim.lr_fit}" if cfg.optim.lr_fit else "MM1's rule over non-embedding parameters"
        print(f"optim.lr=auto -> {cfg.optim.lr:.4g} ({rule}, N={cfg.model.param_counts()['non_embedding']:,})",
              file=sys.stderr)
    device = pick_device(cfg.train.device)
    if device.type == "cpu":
        tune_cpu_allocator()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)

    tok_file = run_dir / "tokenizer.json"
    if data is not None:
        if not resume:
            data.tokenizer.save(str(tok_file))
    else:
        data = prepare_data(
            cfg.data.source, cfg.data.seq_len, cfg.model.vocab_size, val_fraction=cfg.data.val_fraction,
            text_field=cfg.data.text_field,
            tokenizer_path=tok_file if resume else cfg.data.tokenizer,
            tokenizer_train_bytes=cfg.data.tokenizer_train_bytes,
            save_tokenizer_to=None if resume else tok_file)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")

    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if init is not None:
        load_model_weights(model, ck.resolve_checkpoint(init))
    if prepare_model is not None:
        prepare_model(model)
    opt = build_optimizer(model, cfg.optim)
    state: dict = {}
    if start_ckpt is not None:
        state = ck.check_checkpoint(start_ckpt)
        load_model_weights(model, start_ckpt)
        ck.load_optimizer(opt, ck.load_tensors(start_ckpt, "optimizer.safetensors"), state["param_groups"])
        ck.restore_rng(ck.load_tensors(start_ckpt, "rng.safetensors"))
        truncate_after(run_dir / "metrics.jsonl", state["step"])

    tc = cfg.train
    step = int(state.get("step", 0))
    sampler = Sampler(len(data.train), tc.batch_size, tc.seed, SamplerState(**state.get("sampler", {})))
    health = HealthMonitor(tc.spike_factor, tc.spike_window, tc.collapse_max_violation, tc.collapse_window,
                           state.get("health"))
    tokens_seen = int(state.get("tokens", 0))
    elapsed = float(state.get("elapsed_s", 0.0))  # training wall-clock, summed over resumes
    end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    metrics = MetricsWriter(run_dir)
    window = MoEWindow()
    ctx = autocast_ctx(cfg, device)
    val_loss = state.get("val_loss")
    # tokens/s counts optimizer-step time only (evaluation and checkpoints excluded)
    t_window, tok_window, tps = elapsed, 0, 0.0
    start_elapsed, start_tokens = elapsed, tokens_seen
    last_summary: list[dict] = []
    pending: list[str] = []  # warnings waiting for the next metrics line

    def trainer_state() -> dict:
        return {"sampler": vars(sampler.state), "health": health.state(), "tokens": tokens_seen,
                "val_loss": val_loss, "total_steps": tc.steps, "elapsed_s": elapsed}

    model.train()
    bar = tqdm(total=end, initial=step, disable=quiet, file=sys.stderr, dynamic_ncols=True,
               desc=cfg.name, unit="step")
    try:
        while step < end:
            t_step = time.perf_counter()
            lr = lr_at(step, tc.steps, cfg.optim)
            for g in opt.param_groups:
                g["lr"] = lr
            loads = None
            loss_sum = lm_sum = 0.0
            step_tokens = 0
            for _ in range(tc.grad_accum):
                x, y, *mask = data.train.batch(sampler.next())
                # padding (SFT rows) is not work done: count only real tokens
                step_tokens += int(mask[0].sum()) if mask else x.numel()
                with ctx:
                    out = model(x.to(device), y.to(device), mask[0].to(device) if mask else None)
                (out.loss / tc.grad_accum).backward()
                loss_sum += out.loss.item() / tc.grad_accum
                lm_sum += out.lm_loss.item() / tc.grad_accum
                window.add(out.moe_stats)
                step_loads = [s.tokens_per_expert for s in out.moe_stats]
                loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
            spike = health.check_loss(step + 1, loss_sum)
            if spike:
                tqdm.write(f"warning: {spike}", file=sys.stderr)
                pending.append(spike)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc_clip(cfg))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loads:
                model.update_router_biases(loads)
            step += 1
            elapsed += time.perf_counter() - t_step
            tokens_seen += step_tokens
            tok_window += step_tokens
            bar.update(1)

            evaluated = step % tc.eval_every == 0 or step == tc.steps
            if evaluated:
                val_loss = evaluate(model, data.val, tc.batch_size, tc.eval_batches, device, ctx)
            if step % tc.log_every == 0 or step == end or evaluated:
                tps = tok_window / max(elapsed - t_window, 1e-9)
                t_window, tok_window = elapsed, 0
                last_summary = window.summary()
                window.reset()
                record = {
                    "step": step, "tokens": tokens_seen, "elapsed_s": elapsed, "loss": loss_sum, "lm_loss": lm_sum,
                    "lb_loss": _mean([m["lb_loss"] for m in last_summary]),
                    "z_loss": _mean([m["z_loss"] for m in last_summary]),
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps,
                    "peak_mem_bytes": peak_memory_bytes(device), "loss_spikes": health.spikes,
                    "moe_layers": last_summary,
                }
                if evaluated:
                    record["val_loss"] = val_loss
                for w in health.check_router(step, [m["max_violation"] for m in last_summary]):
                    tqdm.write(f"warning: {w}", file=sys.stderr)
                    pending.append(w)
                if pending:
                    record["warnings"], pending = pending, []
                metrics.write(record)
                bar.set_postfix(loss=f"{loss_sum:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                                tok_s=f"{tps:,.0f}")
            if step % tc.ckpt_every == 0 or step == end:
                ck.save_checkpoint(ckpt_root, step, model, opt, trainer_state(), keep=tc.keep_checkpoints)
    finally:
        bar.close()
        metrics.close()
    mean_tps = (tokens_seen - start_tokens) / max(elapsed - start_elapsed, 1e-9)
    return TrainResult(run_dir, step, val_loss, mean_tps, cfg.model.param_counts(),
                       [m["load"] for m in last_summary], stopped_early=step < tc.steps)


def tc_clip(cfg: RunConfig) -> float:
    return cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
