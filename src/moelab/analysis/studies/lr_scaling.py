"""Learning-rate scaling the MM1 way: grid-search the peak LR at several small sizes,
then fit log(eta*) = a * log(N) + b over the parameter count N and predict eta* for a
target size. MM1 (McKinney et al. 2024) published a = -0.4214, b = -0.5535 over
non-embedding parameters, with weight decay lambda = 0.1 * eta.

Size ladder: a size is a d_model. Heads keep the recipe's head dimension, d_ff and the
expert hidden keep their ratio to d_model, and depth scales with width (fixed
d_model / n_layers aspect ratio, at least 2 layers).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...config import ConfigError, ModelConfig, MoEConfig
from ...train.lr_rule import MM1_A, MM1_B, mm1_lr, predict_lr, resolve_auto_lr
from ..html import save_png

__all__ = ["MM1_A", "MM1_B", "mm1_lr", "predict_lr", "resolve_auto_lr", "scale_model", "fit_sweep", "fit_power_law"]
COUNTS = ("non_embedding", "active", "total")


def scale_model(base: ModelConfig, d_model: int, flag: str = "--sizes") -> ModelConfig:
    """The recipe's model at width `d_model`: head dimension kept, FFN and expert widths in proportion, depth by the
    fixed aspect ratio (at least 2 layers)."""
    hd = base.head_dim
    if d_model % hd:
        raise ConfigError(f"{flag}: d_model {d_model} is not a multiple of the recipe's head dim {hd}")
    r = d_model / base.d_model
    n_heads = d_model // hd
    kv = max(1, round(base.kv_heads * r))
    while n_heads % kv:
        kv -= 1
    moe = None
    if base.moe is not None:
        m = base.moe
        moe = MoEConfig(
            **{
                **m.__dict__,
                "d_model": d_model,
                "d_expert": max(4, round(m.d_expert * r / 4) * 4),
                "d_shared": None if m.d_shared is None else max(4, round(m.d_shared * r / 4) * 4),
            }
        )
    return ModelConfig(
        **{
            **base.__dict__,
            "d_model": d_model,
            "n_heads": n_heads,
            "n_kv_heads": kv,
            "d_ff": max(4, round(base.d_ff * r / 4) * 4),
            "n_layers": max(2, round(base.n_layers * r)),
            "moe": moe,
        }
    )


# ------------------------------------------------------------------ fitting
@dataclass
class SizeOptimum:
    """The best learning rate found at one size: parameter count N, the optimum (quadratic in log LR around the grid
    minimum), its loss, and whether it lies at the grid's edge."""

    d_model: int
    n_params: int
    lr: float
    loss: float
    at_edge: bool


def quadratic_optimum(lrs: list[float], losses: list[float]) -> tuple[float, float, bool]:
    """Optimal LR from a parabola in log(lr) through the best grid point and its
    neighbours. At a grid edge (or a non-convex fit) the best grid point is returned
    with a warning. Returns (lr, predicted loss, at_edge)."""
    order = np.argsort(lrs)
    x = np.log(np.asarray(lrs, dtype=float)[order])
    y = np.asarray(losses, dtype=float)[order]
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        warnings.warn(f"best LR {math.exp(x[i]):.3g} is at the edge of the grid; widen --lrs", stacklevel=2)
        return float(np.asarray(lrs, dtype=float)[order][i]), float(y[i]), True
    lo, hi = max(0, i - 2), min(len(x), i + 3)
    c2, c1, c0 = np.polyfit(x[lo:hi], y[lo:hi], 2)
    if c2 <= 0:
        warnings.warn("loss is not convex around the best LR; using the best grid point", stacklevel=2)
        return float(np.asarray(lrs, dtype=float)[order][i]), float(y[i]), True
    xo = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
    return float(math.exp(xo)), float(c2 * xo * xo + c1 * xo + c0), False


def fit_power_law(n: list[float], lr: list[float], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Least squares log(lr) = a log(N) + b, with R^2 and a bootstrap 90% interval."""
    x, y = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(lr, dtype=float))
    if len(x) < 2:
        raise ConfigError("lr-fit needs at least two sizes")
    a, b = np.polyfit(x, y, 1)
    resid = y - (a * x + b)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(set(idx.tolist())) < 2:
            continue
        samples.append(np.polyfit(x[idx], y[idx], 1))
    s = np.asarray(samples) if samples else np.asarray([[a, b]])
    return {
        "a": float(a),
        "b": float(b),
        "r2": r2,
        "a_interval": [float(np.percentile(s[:, 0], 5)), float(np.percentile(s[:, 0], 95))],
        "b_interval": [float(np.percentile(s[:, 1], 5)), float(np.percentile(s[:, 1], 95))],
    }


def read_sweep(sweep_dir: Path) -> list[dict]:
    """The rows of DIR/sweep.jsonl (one per finished run); ConfigError when the file is missing."""
    path = Path(sweep_dir) / "sweep.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `moelab lr-sweep` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit_sweep(sweep_dir: Path, count: str = "non_embedding", target_params: float | None = None) -> dict:
    """Fit log(lr*) = a log(N) + b over the sweep's per-size optima (N counted as `count`), with a bootstrap interval,
    write fit.json and lr_fit.png, and predict for `target_params`; returns the fit as a dict."""
    if count not in COUNTS:
        raise ConfigError(f"--count: expected one of {list(COUNTS)}, got {count!r}")
    rows = read_sweep(sweep_dir)
    by_size: dict[int, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["d_model"], []).append(r)
    optima = []
    for d, rs in sorted(by_size.items()):
        ok = [r for r in rs if r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])]
        if len(ok) < 2:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lr, loss, edge = quadratic_optimum([r["lr"] for r in ok], [r["final_val_loss"] for r in ok])
        for w in caught:
            print(f"warning (d_model={d}): {w.message}")
        optima.append(SizeOptimum(d, ok[0]["params"][count], lr, loss, edge))
    fit = fit_power_law([o.n_params for o in optima], [o.lr for o in optima])
    out = {"count": count, "fit": fit, "mm1": {"a": MM1_A, "b": MM1_B}, "optima": [o.__dict__ for o in optima]}
    if target_params:
        eta = predict_lr(fit, target_params)
        out["target"] = {"params": target_params, "lr": eta, "weight_decay": 0.1 * eta, "mm1_lr": mm1_lr(target_params)}
    (Path(sweep_dir) / "fit.json").write_text(json.dumps(out, indent=1))
    plot_fit(Path(sweep_dir), rows, out)
    return out


def plot_fit(sweep_dir: Path, rows: list[dict], fit_out: dict) -> Path:
    """Plot loss against LR per size and the fitted rule against N (with MM1's); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = fit_out["count"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for d in sorted({r["d_model"] for r in rows}):
        rs = sorted((r for r in rows if r["d_model"] == d and r["final_val_loss"] is not None), key=lambda r: r["lr"])
        ax1.plot(
            [r["lr"] for r in rs],
            [r["final_val_loss"] for r in rs],
            marker="o",
            label=f"d={d} (N={rs[0]['params'][count] / 1e6:.2f} M)" if rs else f"d={d}",
        )
    for o in fit_out["optima"]:
        ax1.plot(o["lr"], o["loss"], "k*", ms=10)
    ax1.set_xscale("log")
    ax1.set_xlabel("peak learning rate")
    ax1.set_ylabel("final validation loss")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ns = np.array([o["n_params"] for o in fit_out["optima"]], dtype=float)
    grid = np.geomspace(ns.min() / 3, max(ns.max() * 3, fit_out.get("target", {}).get("params", 0)), 50)
    f = fit_out["fit"]
    ax2.loglog(ns, [o["lr"] for o in fit_out["optima"]], "ko", label="optimum per size")
    ax2.loglog(
        grid, np.exp(f["a"] * np.log(grid) + f["b"]), label=f"fit: a={f['a']:.3f}, b={f['b']:.3f}, R²={f['r2']:.2f}"
    )
    ax2.loglog(grid, [mm1_lr(n) for n in grid], "--", label="MM1: a=-0.4214, b=-0.5535")
    if "target" in fit_out:
        ax2.loglog(fit_out["target"]["params"], fit_out["target"]["lr"], "r*", ms=12, label="target")
    ax2.set_xlabel(f"parameters ({count.replace('_', '-')})")
    ax2.set_ylabel("optimal peak LR")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    path = sweep_dir / "lr_fit.png"
    save_png(fig, path, dpi=110)
    return path
