"""`moelab lr-sweep`: one short run per (size, learning rate), resumable.

DIR/sweep.jsonl gets one line per finished run; a killed sweep continues where it
stopped (finished runs are skipped, a half-finished one resumes from its checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ...errors import ConfigError, NonFiniteError, OutputExists
from ...run_config import load_config
from ...store.checkpoint import latest_checkpoint
from ...store.outputs import guard_output, removed_on_failure, write_json
from ...store.resume import refuse_changed_settings
from ...train import train
from .lr_scaling import read_sweep, scale_model

SETTINGS_FILE = "sweep.json"  # what the sweep was started with, compared when it is continued


def run_name(d_model: int, lr: float) -> str:
    """The run folder name of one grid point, e.g. 'd64-lr0.003'."""
    return f"d{d_model}-lr{lr:.3g}"


def lr_sweep(
    recipe: str,
    *,
    sizes: list[int],
    lrs: list[float],
    data: str | None,
    out: Path,
    steps: int | None = None,
    tokens_per_param: float | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Train `recipe` at every size and peak LR of the grid into OUT/runs, appending one row per finished run to
    OUT/sweep.jsonl; finished runs are skipped and interrupted ones resumed. A diverged run is recorded with loss
    None. Returns all rows."""
    out = guard_output(out, protect=[recipe, data])
    base = load_config(recipe, overrides)
    if data:
        base.data.source = data
    settings = {
        "recipe": recipe,
        "data": base.data.source,
        "steps": steps,
        "tokens_per_param": tokens_per_param,
        "overrides": sorted(overrides or []),
    }
    if (out / SETTINGS_FILE).is_file():  # a sweep continued: the grid may grow, the runs must stay comparable
        refuse_changed_settings(
            json.loads((out / SETTINGS_FILE).read_text()),
            settings,
            out / SETTINGS_FILE,
            flag="lr-sweep",
            noun="sweep",
            may_change="the same recipe, --data, --steps or --tokens-per-param and --set; --sizes and --lrs may grow",
        )
    elif out.is_dir() and any(out.iterdir()) and not (out / "sweep.jsonl").is_file():
        raise OutputExists(f"--out {out} already exists and is not an lr-sweep folder: choose a new folder")
    with removed_on_failure(out, scaffolding=[SETTINGS_FILE]):
        write_json(out / SETTINGS_FILE, settings)
        return _sweep(out, recipe, base, sizes, lrs, steps, tokens_per_param, overrides, quiet)


def _sweep(
    out: Path,
    recipe: str,
    base,
    sizes: list[int],
    lrs: list[float],
    steps: int | None,
    tokens_per_param: float | None,
    overrides: list[str] | None,
    quiet: bool,
) -> list[dict]:
    done = {(r["d_model"], r["lr"]) for r in read_sweep(out)} if (out / "sweep.jsonl").exists() else set()
    grid = [(d, lr) for d in sizes for lr in lrs]
    bar = tqdm(grid, desc="lr-sweep", unit="run", disable=quiet)
    for d, lr in bar:
        if (d, lr) in done:
            continue
        cfg = load_config(recipe, overrides)
        cfg.data.source = base.data.source
        cfg.model = scale_model(base.model, d)
        cfg.optim.lr = lr
        cfg.name = run_name(d, lr)
        counts = cfg.model.param_counts()
        if tokens_per_param:
            per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
            cfg.train.steps = max(1, round(tokens_per_param * counts["non_embedding"] / per_step))
        elif steps:
            cfg.train.steps = steps
        cfg.train.ckpt_every = max(1, cfg.train.steps // 4)
        cfg.train.eval_every = cfg.train.steps
        cfg.validate()
        run_dir = out / "runs" / cfg.name
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        bar.set_postfix(run=cfg.name, N=f"{counts['non_embedding'] / 1e6:.2f}M")
        try:
            res = train(cfg, run_dir, resume=resume, overwrite=not resume, quiet=True)
            loss = res.final_val_loss
        except NonFiniteError:  # a diverged LR is a result, not a crash of the sweep
            loss = None
        row = {
            "d_model": d,
            "n_layers": cfg.model.n_layers,
            "lr": lr,
            "steps": cfg.train.steps,
            "params": {k: counts[k] for k in ("non_embedding", "active", "total")},
            "final_val_loss": loss,
            "moe": cfg.model.moe is not None,
        }
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    rows = read_sweep(out)
    if not rows:
        raise ConfigError("lr-sweep produced no runs")
    return rows
