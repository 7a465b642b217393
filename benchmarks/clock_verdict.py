"""Does the MoE reach its dense twin's loss in fewer training seconds? Over several corpora x seeds, pooled.

For each corpus, `moelab compare DENSE MOE --data CORPUS --steps S --seeds N --jobs J` (skipped when OUT/NAME already
holds its summary.json, so a killed run resumes corpus by corpus), then every (corpus, seed) pair pooled:

- the MoE's training seconds to the dense run's final held-out loss, as a ratio of the dense run's seconds;
- the held-out loss difference (MoE - dense) at equal training seconds and at equal tokens;
- the MoE's tokens/s as a ratio of the dense run's (whole run, training seconds only);

each as a mean with its 95% interval (Student's t over the pairs), and the share of each run's training spent with
fewer neighbours than --jobs (the queue's tail, where a run has the machine to itself).

    python benchmarks/clock_verdict.py --data stdlib,/usr/share/vim/vim90/doc,/usr/share/perl/5.36.0 \\
        --out VERDICT [--dense tiny-dense --moe tiny-moe --steps 1000 --seeds 3 --jobs 2] [--set KEY=VALUE ...]

Either model may carry overrides of its own, as compare takes them: `--moe tiny-moe+optim.muon_experts=dion`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moelab.analysis.studies.seeds import mean_interval, recipe_of


def corpus_name(src: str) -> str:
    """A folder name for a corpus: its last path parts, or the built-in's name."""
    parts = [p for p in Path(src).parts if p not in ("/", "usr", "share")]
    return "-".join(parts[-2:]) if parts else src


def run_compare(a, src: str, out: Path) -> dict:
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "moelab", "compare", a.dense, a.moe, "--data", src, "--steps", str(a.steps),
               "--seeds", str(a.seeds), "--jobs", str(a.jobs), "--quiet", "--out", str(out),
               *[x for o in a.set for x in ("--set", o)]]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def pairs(summary: dict, seeds: int) -> list[dict]:
    """One record per seed, the MoE's seed-s run against the dense seed-s run (compare's seed verdict pairs them so;
    its per-run `speedup` is against the first dense run only)."""
    runs = {r["name"]: r for r in summary["runs"]}
    dense = recipe_of(summary["reference"])
    (moe, verdict), = summary["seeds"].items()
    clock = verdict["clock"]
    if len(clock["equal_seconds_diff"]) != seeds:
        raise SystemExit(f"{moe}: a seed has no common training-seconds point with {dense}'s (see its summary.json)")
    out = []
    for s in range(seeds):
        d, m = runs[f"{dense}-seed{s}"], runs[f"{moe}-seed{s}"]
        out.append({
            "seed": s,
            "seconds_ratio": clock["seconds_ratio"][s],  # None: never reached dense's final loss
            "equal_seconds_diff": clock["equal_seconds_diff"][s],
            "equal_tokens_diff": m["final_val_loss"] - d["final_val_loss"],
            "tokens_per_s_ratio": (m["tokens"] / m["seconds"]) / (d["tokens"] / d["seconds"]),
            "short_handed": {m["name"]: m.get("short_handed_share"), d["name"]: d.get("short_handed_share")},
        })
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="corpora, comma-separated")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dense", default="tiny-dense")
    ap.add_argument("--moe", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both recipes")
    a = ap.parse_args(argv)
    rows = []
    for src in a.data.split(","):
        summary = run_compare(a, src, a.out / corpus_name(src))
        for p in pairs(summary, a.seeds):
            rows.append({"corpus": corpus_name(src), "machine": summary["clock_context"], **p})
    print("\n| corpus | seed | seconds to dense's loss (x dense) | at equal seconds | at equal tokens | tokens/s x dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = "not reached" if r["seconds_ratio"] is None else f"{r['seconds_ratio']:.3f}"
        print(f"| {r['corpus']} | {r['seed']} | {ratio} | {r['equal_seconds_diff']:+.4f} | "
              f"{r['equal_tokens_diff']:+.4f} | {r['tokens_per_s_ratio']:.3f} |")
    print(f"\npooled over {len(rows)} pairs (mean, 95% interval):")
    for key, label in (("seconds_ratio", "MoE's seconds to dense's final loss, x dense's"),
                       ("equal_seconds_diff", "MoE - dense at equal training seconds, nats/token"),
                       ("equal_tokens_diff", "MoE - dense at equal tokens (final), nats/token"),
                       ("tokens_per_s_ratio", "MoE's tokens/s, x dense's")):
        xs = [r[key] for r in rows]
        if any(x is None for x in xs):  # censored: the pair's ratio is above its budget's, not a number to average
            reached = [x for x in xs if x is not None]
            print(f"- {label}: {len(xs) - len(reached)} of {len(xs)} pairs never reached it within the budget"
                  + (f" (the others: {', '.join(f'{x:.3f}' for x in reached)})" if reached else ""))
            continue
        mean, low, high = mean_interval(xs)
        print(f"- {label}: {mean:.4f} [{low:.4f}, {high:.4f}]")
    short = {n: s for r in rows for n, s in r["short_handed"].items() if s and s >= 0.05}
    if short:
        print("- runs with fewer neighbours than --jobs for part of their training: "
              + ", ".join(f"{n} {s:.0%}" for n, s in short.items()))
    for m in sorted({r["machine"] for r in rows}):
        print(f"- {m}")
    (a.out / "pooled.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
