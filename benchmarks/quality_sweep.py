"""Which MoE settings make tiny-moe beat tiny-dense at equal active parameters?
(docs/quality.md). Trains each variant for the same steps on the same data, then scores
every run on the whole held-out split with `moelab eval`. Finished runs are reused.

    python benchmarks/quality_sweep.py --data stdlib --out runs/quality/stdlib --steps 1000 --jobs 2
    python benchmarks/quality_sweep.py --data /usr/share/vim/vim90/doc --out runs/quality/vimdoc --steps 1000
    # the MoE against its dense twin, both with Muon, on three corpora x three seeds, pooled:
    python benchmarks/quality_sweep.py --data /usr/share/vim/vim90/doc,stdlib,/usr/share/perl/5.36.0 \
        --out runs/quality/three --steps 1000 --seeds 0,1,2 --variants dense-muon,moe-8x2-lean-muon \
        --reference dense-muon
    # the knobs on top of Muon, against the MoE with Muon (docs/quality.md section 7 screened them with seed 0):
    python benchmarks/quality_sweep.py --data ... --seeds 0 --reference moe-8x2-lean-muon \
        --variants moe-8x2-lean-muon-router,moe-muon-bias,moe-muon-tied,moe-muon-expert-lr0.5,moe-muon-expert-init0.02,\
moe-muon-expert-lr2,moe-muon-shared
    # (moe-muon-global counts what moe-8x2-lean-muon counts unless the step has several micro-batches:
    # data parallelism or train.grad_accum > 1)

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
ADAMW, MUON = ["optim.name=adamw"], ["optim.name=muon"]  # named, so a variant's meaning outlives a recipe's default
_ADAMW_VARIANTS: dict[str, tuple[str, list[str]]] = {  # the settings sweep of docs/quality.md section 2 (AdamW)
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
}
# Muon (the tiny recipes' default since it won, docs/quality.md section 7) and the knobs to try on top of it
_MUON_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense-muon": ("tiny-dense", []),
    "moe-8x2-lean-muon": ("tiny-moe", LEAN),
    "moe-8x2-lean-muon-router": ("tiny-moe", LEAN + ["optim.muon_router=true"]),
    "moe-muon-expert-lr2": ("tiny-moe", LEAN + ["optim.expert_lr_mult=2"]),
    "moe-muon-expert-lr0.5": ("tiny-moe", LEAN + ["optim.expert_lr_mult=0.5"]),
    # Mixtral's init for the experts' output projections (0.02) instead of GPT-2's 0.02 / sqrt(2 n_layers)
    "moe-muon-expert-init0.02": ("tiny-moe", LEAN + ["model.moe.expert_out_std=0.02"]),
    "moe-muon-global": ("tiny-moe", LEAN + ["model.moe.balance_scope=global"]),
    "moe-muon-bias": ("tiny-moe", ["model.moe.z_coef=0", "model.moe.lb_coef=0", "model.moe.bias_update_rate=0.001"]),
    # the experts keep their width (finer ones lost at d_model 128, section 2): top-1 of 8 plus one
    # always-on expert of 256 is the same active FFN width (512) as top-2 of 8
    "moe-muon-shared": ("tiny-moe", LEAN + ["model.moe.top_k=1", "model.moe.n_shared_experts=1"]),
    "dense-muon-tied": ("tiny-dense", ["model.tie_embeddings=true"]),
    "moe-muon-tied": ("tiny-moe", LEAN + ["model.tie_embeddings=true"]),
}
VARIANTS = {k: (r, ADAMW + o) for k, (r, o) in _ADAMW_VARIANTS.items()} | {
    k: (r, MUON + o) for k, (r, o) in _MUON_VARIANTS.items()
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
    return {"name": name, "seed": seed, "data": data, "val_loss": ev["loss"], "tokens": ev["tokens"],
            "params_total": cfg_params["params_total"], "params_active": cfg_params["params_active"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a corpus, or several separated by commas (pooled at the end)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reference", default="dense", help="the variant the others are judged against")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="extra", help="override for every run")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = a.data.split(",")
    variants = a.variants.split(",")
    if a.reference not in variants:
        variants.insert(0, a.reference)
    # seed-major, the reference and its variants side by side: a stopped sweep has whole pairs
    jobs = [(v, int(s), c) for s in a.seeds.split(",") for c in corpora for v in variants]

    def where(corpus: str) -> Path:
        return out / Path(corpus).name if len(corpora) > 1 else out

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: run_one(j[0], j[2], where(j[2]), a.steps, j[1], a.threads, a.extra), jobs))
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    ref = {(r["data"], r["seed"]): r["val_loss"] for r in rows if r["name"] == a.reference}
    print(f"| corpus | variant | seed | held-out loss | vs {a.reference} | params total | params active |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        key = (r["data"], r["seed"])
        rel = f"{(r['val_loss'] / ref[key] - 1) * 100:+.2f}%" if key in ref else "-"
        print(f"| {r['data']} | {r['name']} | {r['seed']} | {r['val_loss']:.4f} | {rel} | {r['params_total']:,} | "
              f"{r['params_active']:,} |")
    for corpus in corpora:
        seeds_summary([r for r in rows if r["data"] == corpus], a.reference, corpus)
    if len(corpora) > 1:
        seeds_summary(rows, a.reference, f"all {len(corpora)} corpora, pooled")


def seeds_summary(rows: list[dict], reference: str = "dense", title: str = "") -> None:
    """Each variant against the reference over the (corpus, seed) pairs both have: the 95%
    interval of the paired loss difference and the verdict it gives (moelab compare
    --seeds's rule; pooled over corpora when the rows span several)."""
    from moelab.analysis.studies.seeds import paired_interval, verdict

    ref = {(r.get("data"), r["seed"]): r["val_loss"] for r in rows if r["name"] == reference}
    names = dict.fromkeys(r["name"] for r in rows if r["name"] != reference)
    lines = []
    for name in names:
        mine = {(r.get("data"), r["seed"]): r["val_loss"] for r in rows if r["name"] == name}
        pairs = sorted(set(mine) & set(ref), key=str)
        if len(pairs) >= 2:
            mean, low, high = paired_interval([ref[p] for p in pairs], [mine[p] for p in pairs])
            lines.append(f"| {name} | {len(pairs)} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict(low, high)} |")
    if lines:
        print(f"\n{title}\n| variant | pairs | loss - {reference} (mean) | 95% interval | verdict |")
        print("|---|---:|---:|---|---|\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
