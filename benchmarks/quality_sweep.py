"""Which MoE settings make tiny-moe beat tiny-dense at equal active parameters?
(docs/quality.md). Trains each variant for the same steps on the same data, then scores
every run on the whole held-out split with `moelab eval`. Finished runs are reused.

    python benchmarks/quality_sweep.py --data stdlib --out runs/quality/stdlib --steps 1000 --jobs 2
    python benchmarks/quality_sweep.py --data /usr/share/vim/vim90/doc --out runs/quality/vimdoc --steps 1000

A variant is a recipe plus overrides; every MoE variant keeps the dense FFN's active
width (top_k x d_expert [+ shared] = d_ff), so active parameters per token stay equal
(to within the router's E x D weights).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LEAN = ["model.moe.z_coef=0", "model.moe.lb_coef=0.001"]
FINE = ["model.moe.n_experts=16", "model.moe.d_expert=128", "model.moe.top_k=4"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("tiny-dense", []),
    "moe-8x2": ("tiny-moe", []),
    "moe-8x2-lean": ("tiny-moe", LEAN),
    "moe-16x4-lean": ("tiny-moe", LEAN + FINE),
    "moe-32x8-lean": ("tiny-moe", LEAN + ["model.moe.n_experts=32", "model.moe.d_expert=64", "model.moe.top_k=8"]),
    "moe-16x4": ("tiny-moe", FINE),
    "moe-16x4-z0": ("tiny-moe", FINE + ["model.moe.z_coef=0"]),
    "moe-16x4-z0-out02": ("tiny-moe", FINE + ["model.moe.z_coef=0", "model.moe.expert_out_std=0.02"]),
    "moe-16x4-lean-norenorm": ("tiny-moe", FINE + LEAN + ["model.moe.renormalize=false"]),
    "moe-16x3+1-lean": ("tiny-moe", LEAN + ["model.moe.n_experts=16", "model.moe.d_expert=128", "model.moe.top_k=3",
                                            "model.moe.n_shared_experts=1"]),
    "dense-muon": ("tiny-dense", ["optim.name=muon"]),
    "moe-8x2-lean-muon": ("tiny-moe", LEAN + ["optim.name=muon"]),
    "moe-8x2-lean-muon-router": ("tiny-moe", LEAN + ["optim.name=muon", "optim.muon_router=true"]),
    "moe-8x2-lean-expert-lr2": ("tiny-moe", LEAN + ["optim.expert_lr_mult=2"]),
    "moe-8x2-lean-global": ("tiny-moe", LEAN + ["model.moe.balance_scope=global"]),
    "moe-8x2-lean-bias": ("tiny-moe", ["model.moe.z_coef=0", "model.moe.lb_coef=0", "model.moe.bias_update_rate=0.001"]),
}


def moelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)


def run_one(name: str, data: str, out: Path, steps: int, seed: int, threads: int, extra: list[str]) -> dict:
    recipe, overrides = VARIANTS[name]
    run = out / f"{name}-s{seed}"
    if not (run / "checkpoints" / f"step-{steps:06d}").is_dir():
        flag = ["--resume"] if (run / "checkpoints").is_dir() else ["--overwrite"]
        r = moelab("train", recipe, "--data", data, "--out", str(run), "--steps", str(steps), "--quiet", *flag,
                   f"train.seed={seed}", f"train.threads={threads}", *overrides, *extra)
        if r.returncode:
            raise RuntimeError(f"{name}: {r.stderr[-2000:]}")
    r = moelab("eval", str(run), "--data", data, "--json")
    if r.returncode:
        raise RuntimeError(f"{name} eval: {r.stderr[-2000:]}")
    ev = json.loads(r.stdout)
    cfg_params = json.loads(moelab("memory", str(run / "config.yaml"), "--json").stdout)[0]
    return {"name": name, "seed": seed, "val_loss": ev["loss"], "tokens": ev["tokens"],
            "params_total": cfg_params["params_total"], "params_active": cfg_params["params_active"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="extra", help="override for every run")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, int(s)) for s in a.seeds.split(",") for v in a.variants.split(",")]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: run_one(j[0], a.data, out, a.steps, j[1], a.threads, a.extra), jobs))
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    dense = {r["seed"]: r["val_loss"] for r in rows if r["name"] == "dense"}
    print("| variant | seed | held-out loss | vs dense | params total | params active |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{(r['val_loss'] / dense[r['seed']] - 1) * 100:+.2f}%" if r["seed"] in dense else "-"
        print(f"| {r['name']} | {r['seed']} | {r['val_loss']:.4f} | {rel} | {r['params_total']:,} | "
              f"{r['params_active']:,} |")
    seeds_summary(rows)


def seeds_summary(rows: list[dict]) -> None:
    """Each variant against dense over the seeds both have: the 95% interval of the paired
    loss difference and the verdict it gives (moelab compare --seeds's rule)."""
    from moelab.analysis.seeds import paired_interval, verdict

    dense = {r["seed"]: r["val_loss"] for r in rows if r["name"] == "dense"}
    names = dict.fromkeys(r["name"] for r in rows if r["name"] != "dense")
    lines = []
    for name in names:
        mine = {r["seed"]: r["val_loss"] for r in rows if r["name"] == name}
        seeds = sorted(set(mine) & set(dense))
        if len(seeds) >= 2:
            mean, low, high = paired_interval([dense[s] for s in seeds], [mine[s] for s in seeds])
            lines.append(f"| {name} | {len(seeds)} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict(low, high)} |")
    if lines:
        print("\n| variant | seeds | loss - dense (mean) | 95% interval | verdict |\n|---|---:|---:|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
