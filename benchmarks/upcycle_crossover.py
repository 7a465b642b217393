"""Where does upcycling start to pay? (docs/scaling.md, "Upcycling's crossover"). A dense run
trained for --base-steps is continued three ways, per seed, at a constant re-warmed peak LR
(so a run continued longer is the same run, and every evaluation on the way is a budget):
as the dense model (`dense`), upcycled to E experts (`copies`, or `dropR`: Drop-Upcycling
ratio R), and, at equal total compute, the MoE recipe trained from scratch for base + N
steps (`scratch`). Held-out loss every --eval-every steps.

Each comparison's difference, other minus reference at the same continuation step s, is
fitted as a + b ln s over the budgets up to --fit-until (pooled over seeds); the crossover
is where it changes sign, s* = exp(-a / b), its 95% interval from refits on seeds
resampled with replacement. The prediction is written (prediction.json) before any run
goes past --fit-until; run again with a larger --steps to continue the same runs past the
predicted crossover and set the measurement against the prediction.

    python benchmarks/upcycle_crossover.py --data stdlib --out runs/crossover --steps 2000 --seeds 0,1,2 \
        --set model.d_model=64 --set model.d_ff=256 --set model.n_heads=4 --moe-set model.moe.d_expert=128
    python benchmarks/upcycle_crossover.py ... --steps 6000      # past the crossover: predicted against measured
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
    r = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"moelab {' '.join(args)}:\n{r.stderr[-2000:]}")
    return r.stdout


def curve(run: Path, offset: int) -> dict[int, float]:
    """Held-out loss by continuation step (the run's step minus `offset`) from its metrics.jsonl."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r and r["step"] > offset:
            out[int(r["step"]) - offset] = float(r["val_loss"])
    return out


def fit_line(steps, deltas) -> tuple[float, float]:
    """(a, b) of delta = a + b ln s, least squares."""
    b, a = np.polyfit(np.log(np.asarray(steps, dtype=float)), np.asarray(deltas, dtype=float), 1)
    return float(a), float(b)


def crossing(a: float, b: float) -> float:
    """The step where a + b ln s changes sign (inf when the line is flat)."""
    return math.exp(min(700.0, -a / b)) if b else math.inf


def predict(curves: dict, seeds: list[int], ref: str, other: str, until: int, boots: int = 2000) -> dict:
    """The crossover of `other` over `ref` fitted on continuation steps <= `until`, pooled over seeds;
    interval from refits on seeds resampled with replacement."""

    def points(chosen):
        s, d = [], []
        for seed in chosen:
            r, o = curves[ref, seed], curves[other, seed]
            for step in sorted(set(r) & set(o)):
                if step <= until:
                    s.append(step)
                    d.append(o[step] - r[step])
        return s, d

    a, b = fit_line(*points(seeds))
    rng = np.random.default_rng(0)
    draws = [crossing(*fit_line(*points(list(rng.choice(seeds, len(seeds)))))) for _ in range(boots)]
    lo, hi = (float(np.percentile(draws, q)) for q in (2.5, 97.5))
    return {"ref": ref, "other": other, "fit_until": until, "a": a, "b": b, "crossover": crossing(a, b),
            "interval": [lo, hi], "gets_ahead": b < 0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="tiny-dense")
    ap.add_argument("--moe", default="tiny-moe", help="the MoE recipe trained from scratch")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--out", default="runs/crossover")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2000, help="continuation steps (a larger value continues the runs)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--fit-until", type=int, default=None, help="fit on budgets up to here (default: the first --steps)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--variant", default="copies", help="copies or dropR (Drop-Upcycling ratio R)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], dest="common", help="override for every run (the model's size)")
    ap.add_argument("--moe-set", action="append", default=[], help="override for the scratch MoE only")
    ap.add_argument("--up-set", action="append", default=[], help="override for the upcycled runs only")
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
        moelab("upcycle", str(base), "--experts", str(a.experts), "--top-k", str(a.top_k), *drop, "--out", str(init))
    cont = ["optim.schedule=constant", f"train.eval_every={a.eval_every}", "train.threads=1"]

    def run(kind: str, seed: int) -> None:
        dst = out / f"{kind}-s{seed}"
        total = a.steps + (a.base_steps if kind == "scratch" else 0)
        if (dst / "checkpoints" / f"step-{total:06d}").is_dir():
            return
        if (dst / "checkpoints").is_dir():  # constant LR: a longer horizon continues the same run
            src = [str(dst / "config.yaml"), "--resume"]
        elif kind == "scratch":
            src = [a.moe, *a.common, *a.moe_set, "--overwrite"]
        else:
            start = base if kind == "dense" else init
            src = [str(start / "config.yaml"), "--init", str(start), "--overwrite", *(a.up_set if kind != "dense" else [])]
        moelab("train", *src, "--data", a.data, "--out", str(dst), "--steps", str(total), "--quiet",
               f"train.seed={seed}", f"train.ckpt_every={a.eval_every}", *cont)

    kinds = ("dense", a.variant, "scratch")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda j: run(*j), [(k, s) for s in seeds for k in kinds]))
    curves = {}
    for s in seeds:
        for k in kinds:
            curves[k, s] = curve(out / f"{k}-s{s}", a.base_steps if k == "scratch" else 0)
    path = out / "prediction.json"
    if path.is_file():
        made = json.loads(path.read_text())
    else:
        until = a.fit_until or a.steps
        made = [predict(curves, seeds, ref, other, until) for ref, other in (("dense", a.variant), (a.variant, "scratch"))]
        path.write_text(json.dumps(made, indent=1))
    (out / "curves.json").write_text(json.dumps({f"{k}-s{s}": c for (k, s), c in curves.items()}, indent=1))
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    print(f"held-out loss by continuation step (mean over seeds {seeds}); scratch at base {a.base_steps} + step")
    print("| step | " + " | ".join(kinds) + " |\n|---:|" + "---:|" * len(kinds))
    for st in steps:
        print(f"| {st} | " + " | ".join(f"{np.mean([curves[k, s][st] for s in seeds]):.4f}" for k in kinds) + " |")
    for p in made:
        lo, hi = p["interval"]
        print(
            f"\n{p['other']} minus {p['ref']}: {p['a']:+.4f} {p['b']:+.4f} ln s (fitted on steps <= {p['fit_until']}); "
            f"{p['other']} {'gets ahead' if p['gets_ahead'] else 'falls behind'} from step {p['crossover']:.0f} "
            f"[{lo:.0f}, {hi:.0f}] (predicted)"
        )
        later = [st for st in steps if st > p["fit_until"]]
        for st in later:
            measured = [curves[p["other"], s][st] - curves[p["ref"], s][st] for s in seeds]
            mean = float(np.mean(measured))
            if len(seeds) > 1:
                from moelab.analysis.studies.seeds import mean_interval

                _, mlo, mhi = mean_interval(measured)
                shown = f"{mean:+.4f} [{mlo:+.4f}, {mhi:+.4f}]"
            else:
                shown = f"{mean:+.4f}"
            print(f"  step {st}: predicted {p['a'] + p['b'] * math.log(st):+.4f}, measured {shown}")


if __name__ == "__main__":
    main()
