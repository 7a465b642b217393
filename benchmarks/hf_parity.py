"""Training-dynamics parity with transformers at a recipe's real size (docs/quality.md).

    python benchmarks/hf_parity.py --recipe tiny-moe --steps 20 --data stdlib
"""
from __future__ import annotations

import argparse

import torch

from moelab.analysis.hf_parity import training_parity
from moelab.run_config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.recipe, ["optim.name=adamw", *a.overrides])  # the transformers loop it is checked against
    cfg.data.source = a.data
    r = training_parity(cfg, a.steps)
    print(f"{a.recipe} vs transformers {r['arch']}: {a.steps} steps, max |loss difference| {r['max_abs_diff']:.2e}")
    print("| step | moelab loss | transformers loss | difference |\n|---:|---:|---:|---:|")
    for i, (x, y) in enumerate(zip(r["moelab"], r["transformers"]), 1):
        print(f"| {i} | {x:.6f} | {y:.6f} | {x - y:+.1e} |")


if __name__ == "__main__":
    main()
