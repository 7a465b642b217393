"""What a second busy process does to moelab on a small machine, per thread setting.

Training tokens/s (tiny-moe, 16 x 128 tokens per step) and the wall time of `generate`
(60 new tokens) with torch's default intra-op threads, with 1, and with moelab's `auto`
(the cores idle at start), with OpenMP's default wait policy (and torch's default
threads under OMP_WAIT_POLICY=PASSIVE), each once alone and once beside a
neighbour: another process keeping one core busy with a 1-thread matmul loop (a second
job, as on a shared workstation). Every cell runs in a fresh process; the cells are
interleaved in rounds so machine noise hits all, and the median is reported.

    python benchmarks/busy_neighbour.py [--rounds 3] [--steps 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CELL = r"""
import json, sys, time, torch
from moelab.run_config import load_config
from moelab.train import train
from moelab.store.run import load_run
from moelab.inference import generate
from moelab.runtime import set_cpu_threads
mode, steps, corpus, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
threads = {"default": torch.get_num_threads(), "1": 1, "auto": None}[mode]
cfg = load_config("tiny-moe", ["train.log_every=1000", "train.eval_every=100000", "train.ckpt_every=100000"])
cfg.data.source, cfg.data.tokenizer, cfg.train.steps, cfg.train.threads = corpus, f"{work}/tok.json", steps, threads
res = train(cfg, f"{work}/run", overwrite=True, quiet=True)
used = torch.get_num_threads()
r = load_run(f"{work}/run", device="cpu")
set_cpu_threads(threads)  # what `moelab generate` does with the run's train.threads
t0 = time.perf_counter()
generate(r, "def main(", 60, 0.8, 50, 0)
print(json.dumps({"tokens_per_s": res.tokens_per_s, "generate_s": time.perf_counter() - t0, "threads": used}))
"""

NEIGHBOUR = r"""
import os, torch
torch.set_num_threads(1)
a, parent = torch.randn(512, 512), os.getppid()
while os.getppid() == parent:  # ends with the benchmark, however that ends
    a = (a @ a).tanh()
"""


def cell(mode: str, passive: bool, busy: bool, steps: int, corpus: str, work: str) -> dict:
    """One measurement in a fresh process: threads `mode`, wait policy, with or without a busy neighbour."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if busy else None
    try:
        if neighbour is not None:
            time.sleep(1.0)  # let it reach its loop
        out = subprocess.run(
            [sys.executable, "-c", CELL, mode, str(steps), corpus, work],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run every cell in rounds and print the table (markdown) of medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        os.environ["MOELAB_CACHE"] = f"{work}/cache"
        corpus = Path(work) / "corpus.txt"
        corpus.write_text(
            "".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}.\n" for i in range(20000))
        )
        cells = [(m, False, b) for b in (False, True) for m in ("default", "1", "auto")]
        cells += [("default", True, b) for b in (False, True)]
        from moelab.data import prepare_data

        prepare_data(str(corpus), 128, 4096, save_tokenizer_to=Path(work) / "tok.json")  # once, outside the timing
        cell("default", False, False, 2, str(corpus), work)  # warms the dataset cache
        results: dict = {c: [] for c in cells}
        for r in range(args.rounds):
            for c in cells:
                results[c].append(cell(*c, args.steps, str(corpus), work))
                print(f"round {r + 1}: {c} -> {results[c][-1]}", file=sys.stderr)
    rows = []
    for (m, p, b), rs in results.items():
        rows.append(
            {
                "threads": m,
                "threads_used": rs[0]["threads"],
                "wait_policy": "PASSIVE" if p else "default",
                "neighbour": "busy" if b else "none",
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                "generate_s": statistics.median(x["generate_s"] for x in rs),
            }
        )
    print("| neighbour | threads | OMP wait policy | training tokens/s | generate 60 tokens (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        t = {"default": "torch default", "1": "1", "auto": "auto"}[row["threads"]] + f" ({row['threads_used']})"
        tps, gen = f"{row['tokens_per_s']:,.0f}", f"{row['generate_s']:.2f}"
        print(f"| {row['neighbour']} | {t} | {row['wait_policy']} | {tps} | {gen} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
