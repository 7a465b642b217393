"""Does upcycling pay? (docs/upcycling.md, the MM1 recipe): a trained dense run continued
for N steps, against the same run upcycled to E experts (top-k copies of its FFN) and
continued for the same N steps with the dense run's hyper-parameters, per seed, scored
with `moelab eval` on the whole held-out split. Upcycling variants: plain copies,
Drop-Upcycling (`dropR`: --drop-ratio R) and fine-grained splitting (`granG`: G slices
per FFN, E/G copies, so the expert count stays E); with 2+ seeds each variant gets the
paired 95% interval of its difference from the dense continuation.

    python benchmarks/upcycle_pays.py --base runs/quality/stdlib/dense-s0 --data stdlib --steps 500 --seeds 0,1,2 \
        --variants copies,drop0.5,gran2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def moelab(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"moelab {' '.join(args)}:\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a finished dense run")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--out", default="runs/upcycle")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="copies", help="comma-separated: copies, dropR, granG")
    ap.add_argument("--set", action="append", default=[], dest="moe_overrides",
                    help="override for the upcycled runs, e.g. model.moe.lb_coef=0.001")
    a = ap.parse_args()
    out = Path(a.out)
    variants = a.variants.split(",")
    for v in variants:
        init = out / f"{v}-init"
        if not (init / "config.yaml").is_file():
            moelab("upcycle", a.base, *upcycle_args(v, a.experts, a.top_k), "--out", str(init))

    def run(kind: str, seed: int) -> dict:
        dst = out / f"{kind}-s{seed}"
        if not (dst / "checkpoints" / f"step-{a.steps:06d}").is_dir():
            init = out / f"{kind}-init"
            src = [str(Path(a.base) / "config.yaml"), "--init", a.base] if kind == "dense" else [
                str(init / "config.yaml"), "--init", str(init), *a.moe_overrides]
            moelab("train", *src, "--data", a.data, "--out", str(dst), "--steps", str(a.steps), "--overwrite",
                   "--quiet", f"train.seed={seed}", "train.threads=1")
        ev = json.loads(moelab("eval", str(dst), "--data", a.data, "--json"))
        return {"kind": kind, "seed": seed, "loss": ev["loss"]}

    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = [(k, s) for s in seeds for k in ("dense", *variants)]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda j: run(*j), jobs))
    (out / "upcycle.json").write_text(json.dumps(rows, indent=1))
    base = json.loads(moelab("eval", a.base, "--data", a.data, "--json"))["loss"]
    loss = {(r["kind"], r["seed"]): r["loss"] for r in rows}
    print(f"base {a.base}: held-out loss {base:.4f}; continued {a.steps} steps")
    print("| seed | dense continued | " + " | ".join(variants) + " |\n|---:|---:|" + "---:|" * len(variants))
    for s in seeds:
        d = loss["dense", s]
        print(f"| {s} | {d:.4f} | " + " | ".join(f"{loss[v, s]:.4f} ({loss[v, s] - d:+.4f})" for v in variants) + " |")
    if len(seeds) > 1:
        from moelab.analysis.studies.seeds import paired_interval, verdict

        print("\n| variant | minus dense (mean) | 95% interval | verdict |\n|---|---:|---|---|")
        for v in variants:
            mean, low, high = paired_interval([loss["dense", s] for s in seeds], [loss[v, s] for s in seeds])
            print(f"| {v} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | {verdict(low, high)} |")


def upcycle_args(variant: str, experts: int, top_k: int) -> list[str]:
    """`moelab upcycle` flags of a variant name: copies, dropR (Drop-Upcycling ratio R), granG (G slices per FFN)."""
    if variant == "copies":
        return ["--experts", str(experts), "--top-k", str(top_k)]
    if variant.startswith("drop"):
        return ["--experts", str(experts), "--top-k", str(top_k), "--drop-ratio", variant[4:]]
    if variant.startswith("gran"):
        g = int(variant[4:])
        return ["--experts", str(experts // g), "--top-k", str(max(1, top_k // g)), "--granularity", str(g)]
    raise SystemExit(f"--variants: unknown variant {variant!r} (copies, dropR, granG)")

if __name__ == "__main__":
    main()
