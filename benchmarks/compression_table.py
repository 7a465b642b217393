"""Every compression of one trained MoE, measured on the same held-out text
(docs/compression.md): distillation into its dense twin (against the twin trained from
scratch), 8 -> 4 experts pruned and merged (each with and without a short re-training),
and int8/4/3/2 experts. Each row: held-out loss, resident weight bytes, eval tokens/s.

    python benchmarks/compression_table.py --teacher runs/quality/stdlib/moe-8x2-lean-s0 \
        --dense runs/quality/stdlib/dense-s0 --data stdlib --out runs/compress
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def moelab(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"moelab {' '.join(args)}:\n{r.stderr[-2000:]}")


def measure(run: Path, data: str, max_tokens: int) -> dict:
    from moelab.model.quant import resident_bytes
    from moelab.inference import evaluate_source
    from moelab.store.run import load_run

    r = load_run(run, device="cpu")
    evaluate_source(r, data, max_tokens=4096)  # warm up (dataset cache, allocator)
    t0 = time.perf_counter()
    ev = evaluate_source(r, data, max_tokens=max_tokens)
    return {"loss": ev["loss"], "bytes": resident_bytes(r.model), "tokens_per_s": ev["tokens"] / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--dense", required=True, help="the dense twin trained from scratch for the teacher's steps")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--out", default="runs/compress")
    ap.add_argument("--distill-steps", type=int, default=1000)
    ap.add_argument("--retrain-steps", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=200_000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out, T, D = Path(a.out), a.teacher, a.data
    rows: list[tuple[str, str, Path]] = [("teacher (MoE)", "", Path(T)), ("dense twin from scratch", "", Path(a.dense))]
    student = out / "distilled"
    if not (student / "checkpoints" / f"step-{a.distill_steps:06d}").is_dir():
        moelab("distill", T, "--student", "tiny-dense", "--data", D, "--out", str(student), "--steps",
               str(a.distill_steps), "--overwrite", "--quiet", "train.threads=1")
    rows.append(("distilled dense student", f"moelab distill {T} --student tiny-dense --data {D} --steps "
                 f"{a.distill_steps}", student))
    for name, folder, cmd in (
        ("pruned 8->4", "pruned4", ["prune-experts", T, "--keep", "4"]),
        ("merged 8->4 (frequency)", "merged4-frequency", ["merge-experts", T, "--experts", "4", "--method", "frequency"]),
        ("merged 8->4 (output-cluster)", "merged4-cluster",
         ["merge-experts", T, "--experts", "4", "--method", "output-cluster"]),
    ):
        dst = out / folder
        if not (dst / "config.yaml").is_file():
            moelab(*cmd, "--calib", D, "--out", str(dst), "--overwrite")
        rows.append((name, "moelab " + " ".join(cmd) + f" --calib {D}", dst))
        re = Path(str(dst) + "-retrained")
        if not (re / "checkpoints" / f"step-{a.retrain_steps:06d}").is_dir():
            moelab("train", str(dst / "config.yaml"), "--init", str(dst), "--data", D, "--out", str(re), "--steps",
                   str(a.retrain_steps), "--overwrite", "--quiet", "train.threads=1")
        rows.append((f"{name} + {a.retrain_steps} steps", f"moelab train {dst}/config.yaml --init {dst} --steps "
                     f"{a.retrain_steps}", re))
    for bits in (8, 4, 3, 2):
        dst = out / f"int{bits}"
        if not (dst / "config.yaml").is_file():
            moelab("quantize", T, "--bits", str(bits), "--group-size", "64", "--out", str(dst), "--overwrite")
        rows.append((f"int{bits} experts (groups of 64)", f"moelab quantize {T} --bits {bits} --group-size 64", dst))
    results = [(name, cmd, measure(path, D, a.max_tokens)) for name, cmd, path in rows]
    t_loss, d_loss = results[0][2]["loss"], results[1][2]["loss"]
    print("| model | held-out loss | vs teacher | resident weights | eval tokens/s | command |\n"
          "|---|---:|---:|---:|---:|---|")
    for name, cmd, m in results:
        print(f"| {name} | {m['loss']:.4f} | {m['loss'] - t_loss:+.4f} | {m['bytes'] / 2**20:.2f} MiB | "
              f"{m['tokens_per_s']:,.0f} | `{cmd}` |")
    s_loss = results[2][2]["loss"]
    if d_loss != t_loss:
        print(f"\ndistillation retained {(d_loss - s_loss) / (d_loss - t_loss):.0%} of the teacher's gain over the "
              f"dense twin ({d_loss:.4f} -> {s_loss:.4f}; teacher {t_loss:.4f})")
    quant = [(32, t_loss)] + [(b + 0.5, m["loss"]) for (n, _, m), b in zip(results[-4:], (8, 4, 3, 2), strict=True)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([q[0] for q in quant], [q[1] for q in quant], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per expert parameter (codes + fp16 scale/zero per 64)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path("docs/images").mkdir(parents=True, exist_ok=True)
    fig.savefig("docs/images/compression_bits.png", dpi=100)
    print(json.dumps({n: m for n, _, m in results}))


if __name__ == "__main__":
    main()
