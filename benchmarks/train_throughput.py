"""Training tokens/s of an MoE recipe against its dense twin (same active parameters).

Full optimizer steps (forward, backward, clipping, AdamW) on random tokens, interleaved
in rounds so machine noise hits both alike; reports median tokens/s and the ratio.

    python benchmarks/train_throughput.py [--dense small-dense --moe small-moe] [--threads 2] [--rounds 5]

A model may carry overrides after '+', and --moe may name several, comma-separated:
`--moe tiny-moe,tiny-moe+optim.muon_experts=stacked`. `+train.compile=true` compiles each block as
`moelab train` does (the first, warm-up round pays the compilation); `+train.batch_size=N` changes the
tokens a step, which is what Muon's share of the step depends on (its cost is per step, not per token).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab import Transformer
from moelab.model.transformer import compile_block
from moelab.run_config import load_config
from moelab.runtime import tune_cpu_allocator
from moelab.train.optim import build_optimizer


def make_step(spec: str, steps_per_round: int):
    recipe, *overrides = spec.split("+")
    cfg = load_config(recipe, overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    if cfg.train.compile:
        for i in range(len(model.layers)):
            compile_block(model.layers[i])
    B, S = cfg.train.batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, S + 1))

    def run() -> tuple[float, float]:
        """(tokens/s, the optimizer's share of the step) over one round."""
        t0 = time.perf_counter()
        t_opt = 0.0
        for _ in range(steps_per_round):
            out = model(x[:, :-1], x[:, 1:])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            t1 = time.perf_counter()
            opt.step()
            t_opt += time.perf_counter() - t1
            opt.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        return steps_per_round * B * S / total, t_opt / total

    return cfg, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="small-dense")
    ap.add_argument("--moe", default="small-moe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        tune_cpu_allocator()
    runs = {name: make_step(name, args.steps_per_round) for name in (args.dense, *args.moe.split(","))}
    for _, run in runs.values():
        run()  # warm-up
    tps = {name: [] for name in runs}
    share = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, run) in runs.items():
            t, s = run()
            tps[name].append(t)
            share[name].append(s)
    med = {n: statistics.median(v) for n, v in tps.items()}
    print("| recipe | params total | params active | tokens a step | tokens/s (median) | × dense | optimizer share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (cfg, _) in runs.items():
        pc = cfg.model.param_counts()
        tokens = cfg.train.batch_size * cfg.data.seq_len
        print(f"| {name} | {pc['total']:,} | {pc['active']:,} | {tokens:,} | {med[name]:,.0f} | "
              f"{med[name] / med[args.dense]:.2f} | {statistics.median(share[name]):.0%} |")
    print(f"\n{args.threads} threads, malloc {args.malloc}, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps")


if __name__ == "__main__":
    main()
