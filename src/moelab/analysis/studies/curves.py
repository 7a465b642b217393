"""A run's held-out loss as curves against training tokens, FLOPs and seconds, and what one curve takes to reach
another's loss or stands at another's budget: the arithmetic behind `moelab compare`'s sentences.

Curves come from each run's metrics.jsonl: validation loss against training tokens, training FLOPs (tokens x the
model's FLOPs per token: 6 x active matmul parameters plus attention) and training wall-clock seconds (optimizer
steps only; evaluation and checkpoint writing are recorded apart).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError
from ...run_config import RunConfig, read_config


@dataclass
class RunCurves:
    """A finished run's config and metrics records, with its validation-loss curve against tokens, FLOPs and seconds."""

    name: str
    cfg: RunConfig
    records: list[dict]
    tokens: list[float] = field(default_factory=list)  # at each validation point
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    machine: str | None = None  # what its seconds were measured on, as the run recorded it

    @property
    def is_moe(self) -> bool:
        """True when the run's model has at least one MoE layer."""
        return self.cfg.model.n_moe_layers > 0


def read_run(run_dir: Path, name: str | None = None) -> RunCurves:
    """Read a run folder's config.yaml and metrics.jsonl; ConfigError naming a missing file or a run without validation
    points."""
    run_dir = Path(run_dir)
    for f in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / f).is_file():
            raise ConfigError(f"{run_dir}: not a finished run folder ({f} is missing)")
    cfg = read_config(run_dir / "config.yaml")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    fpt = cfg.model.flops_per_token(cfg.data.seq_len)
    rc = RunCurves(name or cfg.name, cfg, records)
    for r in records:
        if "val_loss" in r:
            rc.tokens.append(float(r["tokens"]))
            rc.flops.append(float(r["tokens"]) * fpt)
            rc.seconds.append(float(r.get("elapsed_s", 0.0)))
            rc.val_loss.append(float(r["val_loss"]))
        rc.machine = r.get("machine", rc.machine)
    if not rc.val_loss:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds no validation loss")
    return rc


def x_to_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x at which the curve y(x) comes down to `target`, by linear
    interpolation between the stored points; None if it never does."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def y_at(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of y at x; None outside the stored range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 1.0
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def speedups(ref: RunCurves, other: RunCurves) -> dict:
    """How much less tokens / FLOPs / time `other` needs to reach `ref`'s final loss."""
    target = ref.val_loss[-1]
    out: dict[str, Any] = {"target_val_loss": target, "reached": False}
    for axis in ("tokens", "flops", "seconds"):
        need = x_to_reach(getattr(other, axis), other.val_loss, target)
        out[f"{axis}_needed"] = need
        out[f"{axis}_speedup"] = (getattr(ref, axis)[-1] / need) if need else None
    out["reached"] = out["tokens_needed"] is not None
    out["val_loss_at_equal_flops"] = y_at(other.flops, other.val_loss, ref.flops[-1])
    # each at the other's budget: the shorter run's final point against the longer run's curve there
    for axis in ("tokens", "seconds"):
        x = min(getattr(ref, axis)[-1], getattr(other, axis)[-1])
        out[f"equal_{axis}"] = x
        out[f"ref_val_loss_at_equal_{axis}"] = y_at(getattr(ref, axis), ref.val_loss, x) if x > 0 else None
        out[f"val_loss_at_equal_{axis}"] = y_at(getattr(other, axis), other.val_loss, x) if x > 0 else None
    # the clock's figure as the targets state it: the other run's seconds over the reference's
    out["seconds_ratio"] = 1 / out["seconds_speedup"] if out["seconds_speedup"] else None
    return out


def clock_context(curves: list[RunCurves], trained: str) -> str:
    """Where and how the runs' seconds were measured, for the sentence beside any figure on the clock: the machine(s)
    the runs recorded and `trained` (how compare ran them, or that it read them)."""
    machines = sorted({c.machine for c in curves if c.machine})
    if not machines:
        where = "machine not recorded"
    elif len(machines) == 1:
        where = machines[0]
    else:
        where = f"different machines ({'; '.join(machines)}): seconds not comparable"
    return f"{where}; {trained}"


def head_to_head(ref: RunCurves, other: RunCurves, sp: dict, context: str) -> str:
    """The first sentence about a run: the equal-tokens result beside the equal-seconds one (training seconds:
    optimizer steps only, evaluation and checkpoints excluded), and what it took to reach the reference's loss."""

    def at(axis: str, unit: str) -> str:
        a, b = sp[f"ref_val_loss_at_equal_{axis}"], sp[f"val_loss_at_equal_{axis}"]
        if a is None or b is None:
            return f"at equal {unit}: no common point"
        x = sp[f"equal_{axis}"]
        amount = f"{x:,.0f} tokens" if axis == "tokens" else f"{x:,.1f} training seconds"
        return f"at equal {unit} ({amount}) {b:.4f} vs {a:.4f} ({b - a:+.4f} nats/token)"

    if sp["reached"]:
        ratio = sp["seconds_ratio"]
        reach = f"to {ref.name}'s final loss {sp['tokens_speedup']:.2f}x fewer tokens" + (
            f" and {ratio:.2f}x its training seconds" if ratio is not None else ""
        )
    else:
        reach = f"{ref.name}'s final loss not reached"
    return (
        f"{other.name} vs {ref.name}, held-out loss {at('tokens', 'tokens')}, {at('seconds', 'seconds')}; "
        f"{reach} (seconds on {context})."
    )
