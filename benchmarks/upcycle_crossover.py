"""Where does upcycling start to pay? (docs/scaling.md, "Upcycling's crossover"). A dense run
trained for --base-steps is continued three ways, per seed, at a constant re-warmed peak LR
(so a run continued longer is the same run, and every evaluation on the way is a budget):
as the dense model (`dense`), upcycled to E experts (`copies`, or `dropR`: Drop-Upcycling
ratio R), and the MoE recipe trained from scratch (`scratch`). Held-out loss every
--eval-every steps.

Runs are compared at equal total compute, the base run's included: a run's compute at a
step is the FLOPs per token of its model (`ModelConfig.flops_per_token`: copies of the full
FFN at top-2 cost more per token than the dense model) x its tokens, plus the base's for a
continuation. Each comparison's difference, other minus reference, at the other run's
evaluations (the reference's loss interpolated in log compute between its evaluations),
is fitted as a + b ln X over X, the compute spent after the base, pooled over seeds, using
only the evaluations each run had made by --fit-until continuation steps; the crossover is
where it changes sign, X* = exp(-a / b), its 95% interval from refits on seeds resampled
with replacement. The prediction is written (prediction.json) before any run goes past
--fit-until; run again with a larger --steps to continue the same runs past the predicted
crossover and set the measurement against the prediction.

    python benchmarks/upcycle_crossover.py --data stdlib --out runs/crossover --steps 2000 --seeds 0,1,2 \
        --set model.d_model=64 --set model.d_ff=256 --set model.n_heads=4 --moe-set model.moe.d_expert=128
    python benchmarks/upcycle_crossover.py ... --horizon copies=3500 --horizon scratch=5750   # past the crossover

The recipes' knobs, one folder each: the re-warmed peak LR (`--up-set optim.lr=...`, and `--dense-set` for the dense
continuation it is set against), Drop-Upcycling (`--variant drop0.5`), the router's start (`--router-init normal`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def moelab(*args: str) -> str:
    """Run a moelab command; its stdout, or RuntimeError with its stderr's end."""
    r = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"moelab {' '.join(args)}:\n{r.stderr[-2000:]}")
    return r.stdout


def curve(run: Path) -> dict[int, float]:
    """Held-out loss by step from a run's metrics.jsonl."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r:
            out[int(r["step"])] = float(r["val_loss"])
    return out


def flops_per_step(run: Path) -> float:
    """A run's training FLOPs per optimizer step, from its config."""
    from moelab.run_config import read_config

    cfg = read_config(run / "config.yaml")
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return float(cfg.model.flops_per_token(cfg.data.seq_len) * tokens)


def on_compute(steps_loss: dict[int, float], start: float, per_step: float) -> list[tuple[float, float]]:
    """(compute after the base, loss) at each evaluation of a run whose step 0 stands at `start` FLOPs after the
    base (negative for a run from scratch) and that spends `per_step` FLOPs a step."""
    return [(start + st * per_step, loss) for st, loss in sorted(steps_loss.items())]


def at(points: list[tuple[float, float]], x: float) -> float | None:
    """The loss of a curve at compute `x`, linear in log compute between its evaluations; None outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1 and x0 > 0:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return None


def differences(ref: list[tuple[float, float]], other: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(X, other minus ref) at the other run's evaluations after the base that the ref's evaluations span."""
    out = []
    for x, loss in other:
        r = at(ref, x) if x > 0 else None
        if r is not None:
            out.append((x, loss - r))
    return out


def fit_line(steps, deltas) -> tuple[float, float]:
    """(a, b) of delta = a + b ln s, least squares."""
    b, a = np.polyfit(np.log(np.asarray(steps, dtype=float)), np.asarray(deltas, dtype=float), 1)
    return float(a), float(b)


def crossing(a: float, b: float) -> float:
    """The step where a + b ln s changes sign (inf when the line is flat)."""
    return math.exp(min(700.0, -a / b)) if b else math.inf


def predict(diffs: dict[int, list[tuple[float, float]]], boots: int = 2000) -> dict:
    """The crossover X* where a + b ln X, fitted to each seed's (X, difference) pooled, changes sign; interval from
    refits on seeds resampled with replacement."""
    seeds = sorted(diffs)

    def fit(chosen):
        pts = [p for sd in chosen for p in diffs[sd]]
        return fit_line([x for x, _ in pts], [d for _, d in pts])

    a, b = fit(seeds)
    rng = np.random.default_rng(0)
    draws = [crossing(*fit(list(rng.choice(seeds, len(seeds))))) for _ in range(boots)]
    lo, hi = (float(np.percentile(draws, q)) for q in (2.5, 97.5))
    return {"a": a, "b": b, "crossover": crossing(a, b), "interval": [lo, hi], "gets_ahead": b < 0}


def main() -> None:
    """Train (or continue) the base, the continuations and the scratch runs; print the curves and the crossovers."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="tiny-dense")
    ap.add_argument("--moe", default="tiny-moe", help="the MoE recipe trained from scratch")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--out", default="runs/crossover")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000, help="continuation steps (a larger value continues the runs)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--fit-until", type=int, default=None,
                    help="fit on evaluations up to here (default: the first --steps)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--variant", default="copies", help="copies or dropR (Drop-Upcycling ratio R)")
    ap.add_argument("--router-init", default="zeros", choices=("zeros", "normal"),
                    help="the upcycled routers' initial weights (moelab upcycle --router-init)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], dest="common",
                    help="override for every run (the model's size)")
    ap.add_argument("--moe-set", action="append", default=[], help="override for the scratch MoE only")
    ap.add_argument("--up-set", action="append", default=[], help="override for the upcycled runs only")
    ap.add_argument("--dense-set", action="append", default=[],
                    help="override for the dense continuation only (e.g. the same re-warmed peak LR as --up-set)")
    ap.add_argument("--horizon", action="append", default=[],
                    help="KIND=STEPS: train that kind's runs to STEPS instead (scratch counted from its step 0), e.g. "
                         "to continue only the runs a crossover needs")
    a = ap.parse_args()
    out = Path(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    base = out / "base"
    if not (base / "checkpoints" / f"step-{a.base_steps:06d}").is_dir():
        moelab("train", a.dense, "--data", a.data, "--out", str(base), "--steps", str(a.base_steps), "--overwrite",
               "--quiet", "train.seed=1000", f"train.eval_every={a.base_steps}", *a.common)
    init = out / f"{a.variant}-init"
    if not (init / "config.yaml").is_file():
        drop = ["--drop-ratio", a.variant[4:]] if a.variant.startswith("drop") else []
        moelab("upcycle", str(base), "--experts", str(a.experts), "--top-k", str(a.top_k), *drop,
               "--router-init", a.router_init, "--out", str(init))
    cont = ["optim.schedule=constant", f"train.eval_every={a.eval_every}", "train.threads=1"]

    horizons = dict(h.split("=") for h in a.horizon)

    def run(kind: str, seed: int) -> None:
        dst = out / f"{kind}-s{seed}"
        total = int(horizons.get(kind, a.steps + (a.base_steps if kind == "scratch" else 0)))
        done = [int(c.name[5:]) for c in (dst / "checkpoints").glob("step-*")] if (dst / "checkpoints").is_dir() else []
        if done and max(done) >= total:  # there already (or further: a shorter horizon reads the same run)
            return
        if (dst / "checkpoints").is_dir():  # constant LR: a longer horizon continues the same run
            src = [str(dst / "config.yaml"), "--resume"]
        elif kind == "scratch":
            src = [a.moe, *a.common, *a.moe_set, "--overwrite"]
        else:
            first = base if kind == "dense" else init
            src = [str(first / "config.yaml"), "--init", str(first), "--overwrite",
                   *(a.up_set if kind != "dense" else a.dense_set)]
        moelab("train", *src, "--data", a.data, "--out", str(dst), "--steps", str(total), "--quiet",
               f"train.seed={seed}", f"train.ckpt_every={a.eval_every}", *cont)

    kinds = ("dense", a.variant, "scratch")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda j: run(*j), [(k, s) for s in seeds for k in kinds]))
    curves = {(k, sd): curve(out / f"{k}-s{sd}") for sd in seeds for k in kinds}
    per_step = {k: flops_per_step(out / f"{k}-s{seeds[0]}") for k in kinds}
    base_flops = a.base_steps * flops_per_step(base)
    start = {"dense": 0.0, a.variant: 0.0, "scratch": -base_flops}  # compute after the base at each run's step 0
    offset = {"dense": 0, a.variant: 0, "scratch": a.base_steps}  # a run's step at the base's end

    def points(kind, sd, until=None):
        c = {st: v for st, v in curves[kind, sd].items() if until is None or st <= offset[kind] + until}
        return on_compute(c, start[kind], per_step[kind])

    pairs = (("dense", a.variant), (a.variant, "scratch"))
    path = out / "prediction.json"
    if path.is_file():
        made = json.loads(path.read_text())
    else:  # only the evaluations each run had made by --fit-until continuation steps
        until = a.fit_until or a.steps
        made = []
        for ref, other in pairs:
            diffs = {sd: differences(points(ref, sd, until), points(other, sd, until)) for sd in seeds}
            made.append({"ref": ref, "other": other, "fit_until": until, **predict(diffs)})
        path.write_text(json.dumps(made, indent=1))
    (out / "curves.json").write_text(json.dumps({f"{k}-s{sd}": c for (k, sd), c in curves.items()}, indent=1))
    print(f"held-out loss (mean over seeds {seeds}) by step after the base; scratch from step 0, at base + step")
    steps = sorted(set.intersection(*(set(c) for (k, _), c in curves.items() if k != "scratch")))
    print("| step | " + " | ".join(kinds) + " |\n|---:|" + "---:|" * len(kinds))
    for st in steps:
        row = [np.mean([curves[k, sd].get(st + offset[k], math.nan) for sd in seeds]) for k in kinds]
        print(f"| {st} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    print("FLOPs a step: " + ", ".join(f"{k} {v:.3g}" for k, v in per_step.items()) + f"; base {base_flops:.3g}")
    for p in made:
        lo, hi = p["interval"]
        steps_of = "; ".join(f"{k}: {p['crossover'] / per_step[k]:.0f} steps" for k in (p["ref"], p["other"])
                             if k != "scratch")  # fmt: skip
        print(
            f"\n{p['other']} minus {p['ref']} at equal total compute: {p['a']:+.4f} {p['b']:+.4f} ln X (X = FLOPs "
            f"after the base; evaluations up to {p['fit_until']} steps after it); {p['other']} "
            f"{'gets ahead' if p['gets_ahead'] else 'falls behind'} from X = {p['crossover']:.3g} "
            f"[{lo:.3g}, {hi:.3g}] ({steps_of}) (predicted)"
        )
        later: dict[int, list[float]] = {}  # the evaluations the fit did not see
        for sd in seeds:
            seen = {round(x) for x, _ in differences(points(p["ref"], sd, p["fit_until"]),
                                                    points(p["other"], sd, p["fit_until"]))}  # fmt: skip
            for x, dlt in differences(points(p["ref"], sd), points(p["other"], sd)):
                if round(x) not in seen:
                    later.setdefault(round(x), []).append(dlt)
        for x, measured in sorted(later.items()):
            if len(measured) < len(seeds):
                continue
            mean = float(np.mean(measured))
            if len(seeds) > 1:
                from moelab.analysis.studies.seeds import mean_interval

                _, mlo, mhi = mean_interval(measured)
                shown = f"{mean:+.4f} [{mlo:+.4f}, {mhi:+.4f}]"
            else:
                shown = f"{mean:+.4f}"
            print(f"  X = {x:.3g}: predicted {p['a'] + p['b'] * math.log(x):+.4f}, measured {shown}")


if __name__ == "__main__":
    main()
