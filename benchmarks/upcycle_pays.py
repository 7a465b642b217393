"""Does upcycling pay? (docs/upcycling.md, the MM1 recipe): a trained dense run continued
for N steps, against the same run upcycled to E experts (top-k copies of its FFN) and
continued for the same N steps with the dense run's hyper-parameters, per seed, scored
with `moelab eval` on the whole held-out split.

    python benchmarks/upcycle_pays.py --base runs/quality/stdlib/dense-s0 --data stdlib --steps 500 --seeds 0,1
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
    ap.add_argument("--set", action="append", default=[], dest="moe_overrides",
                    help="override for the upcycled runs, e.g. model.moe.lb_coef=0.001")
    a = ap.parse_args()
    out = Path(a.out)
    up = out / "upcycled-init"
    if not (up / "config.yaml").is_file():
        moelab("upcycle", a.base, "--experts", str(a.experts), "--top-k", str(a.top_k), "--out", str(up))

    def run(kind: str, seed: int) -> dict:
        dst = out / f"{kind}-s{seed}"
        if not (dst / "checkpoints" / f"step-{a.steps:06d}").is_dir():
            src = [str(Path(a.base) / "config.yaml"), "--init", a.base] if kind == "dense" else [
                str(up / "config.yaml"), "--init", str(up), *a.moe_overrides]
            moelab("train", *src, "--data", a.data, "--out", str(dst), "--steps", str(a.steps), "--overwrite",
                   "--quiet", f"train.seed={seed}", "train.threads=1")
        ev = json.loads(moelab("eval", str(dst), "--data", a.data, "--json"))
        return {"kind": kind, "seed": seed, "loss": ev["loss"]}

    jobs = [(k, int(s)) for s in a.seeds.split(",") for k in ("dense", "upcycled")]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda j: run(*j), jobs))
    base = json.loads(moelab("eval", a.base, "--data", a.data, "--json"))["loss"]
    print(f"base {a.base}: held-out loss {base:.4f}")
    print("| seed | dense continued | upcycled continued | difference |\n|---:|---:|---:|---:|")
    for s in sorted({r["seed"] for r in rows}):
        d = next(r["loss"] for r in rows if r["seed"] == s and r["kind"] == "dense")
        u = next(r["loss"] for r in rows if r["seed"] == s and r["kind"] == "upcycled")
        print(f"| {s} | {d:.4f} | {u:.4f} | {u - d:+.4f} |")


if __name__ == "__main__":
    main()
