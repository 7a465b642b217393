"""`make demo`: train tiny-dense and tiny-moe on the standard library and compare them."""

from __future__ import annotations

from pathlib import Path

from .analysis.studies.compare import compare


def _spread(load: list[float]) -> str:
    return f"{min(load):.3f}..{max(load):.3f}" if load else "-"


# Long enough for the MoE to pass its dense twin on stdlib (docs/quality.md), short enough
# for both runs to finish in about six minutes on 2 cores.
DEMO_STEPS = 1000


def run_demo(out: Path, steps: int | None = None) -> dict:
    """Train tiny-dense and tiny-moe on stdlib into OUT, print them side by side and write the compare report; returns
    the compare summary."""
    summary = compare(["tiny-dense", "tiny-moe"], "stdlib", out, steps=steps or DEMO_STEPS, overwrite=True)
    runs = summary["runs"]
    rows = [("", *(r["name"] for r in runs))]
    rows.append(("val loss (nats/token)", *(f"{r['final_val_loss']:.4f}" for r in runs)))
    rows.append(("training tokens/s", *(f"{r['tokens_per_s']:,.0f}" for r in runs)))
    rows.append(("params total", *(f"{r['params_total']:,}" for r in runs)))
    rows.append(("params active/token", *(f"{r['params_active']:,}" for r in runs)))
    for i in range(max(len(r["final_expert_load"]) for r in runs)):
        rows.append(
            (
                f"expert load min..max, layer {i}",
                *(_spread(r["final_expert_load"][i]) if i < len(r["final_expert_load"]) else "-" for r in runs),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print("\n(a uniform expert load is 1/8 = 0.125)\n")
    for line in summary["summary"]:
        print(line)
    for line in summary.get("inference", {}).get("text", []):  # serving: each run decoding with its KV cache
        print(line)
    print(f"\nReport: {out / 'report.html'} (plots embedded; open it in a browser)")
    print(f"Run folders: {', '.join(r['run_dir'] for r in runs)} (metrics.jsonl, tb/ for TensorBoard, checkpoints/)")
    return summary
