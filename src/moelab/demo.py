"""`make demo`: train tiny-dense and tiny-moe on the standard library, side by side."""
from __future__ import annotations

import sys
from pathlib import Path

from .run_config import load_config
from .train import train


def _spread(load: list[float]) -> str:
    if not load:
        return "-"
    return f"{min(load):.3f}..{max(load):.3f}"


def run_demo(out: Path, steps: int | None = None) -> dict:
    results = {}
    for recipe in ("tiny-dense", "tiny-moe"):
        cfg = load_config(recipe)
        cfg.data.source = "stdlib"
        if steps:
            cfg.train.steps = steps
        print(f"\n== training {recipe} on stdlib for {cfg.train.steps} steps -> {out / recipe}", file=sys.stderr)
        results[recipe] = train(cfg, out / recipe, overwrite=True)

    rows = [("", *results)]
    rows.append(("val loss (nats/token)", *(f"{r.final_val_loss:.4f}" for r in results.values())))
    rows.append(("training tokens/s", *(f"{r.tokens_per_s:,.0f}" for r in results.values())))
    rows.append(("params total", *(f"{r.params['total']:,}" for r in results.values())))
    rows.append(("params active/token", *(f"{r.params['active']:,}" for r in results.values())))
    for i in range(max(len(r.expert_load) for r in results.values())):
        rows.append((f"expert load min..max, layer {i}",
                     *(_spread(r.expert_load[i]) if i < len(r.expert_load) else "-" for r in results.values())))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nRun folders: {', '.join(str(r.run_dir) for r in results.values())} "
          "(metrics.jsonl, tb/ for TensorBoard, checkpoints/). A uniform load is 1/8 = 0.125 per expert.")
    return results
