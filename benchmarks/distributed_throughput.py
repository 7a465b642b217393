"""Training tokens/s of one recipe in 1 process vs N processes on this machine, and the
share of step time spent in the expert-parallel all-to-all.

Every layout runs moelab's own step (forward, backward, gradient finishing, AdamW) on
the same global batch of random tokens with the same total thread count (1 process x N
threads vs N processes x 1 thread), interleaved in rounds so machine noise hits all.

    python benchmarks/distributed_throughput.py [--recipe small-moe] [--procs 2] [--rounds 3] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed_all_to_all():
    """Wrap the dispatcher's all_to_all_single to add up its wall time (counts and rows)."""
    import moelab.parallel.expert_parallel as ep

    spent = [0.0]
    real = ep.dist.all_to_all_single

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    ep.dist.all_to_all_single = timed
    return spent


def run_layout(rank, recipe, layout, threads, steps, rounds):
    import torch.distributed as dist

    from moelab import Transformer
    from moelab.data.loader import rank_slice
    from moelab.parallel.mesh import init_parallel
    from moelab.parallel.parallelize import finish_gradients, parallelize
    from moelab.run_config import load_config
    from moelab.runtime import tune_cpu_allocator
    from moelab.train.optim import build_optimizer

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    cfg = load_config(recipe, layout)
    par = init_parallel(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if par is not None:
        parallelize(model, par)
    opt = build_optimizer(model, cfg.optim)
    B, S = cfg.train.batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    if par is not None:
        x = x[torch.from_numpy(rank_slice(torch.arange(B).numpy(), par.rank, par.world))]
    spent = _timed_all_to_all()

    def step():
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        if par is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            finish_gradients(model, par, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    results = []
    for _ in range(rounds):
        if par is not None:
            dist.barrier()
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
        results.append({"tokens_per_s": steps * B * S / wall, "a2a_share": spent[0] / wall})
    if par is not None:
        dist.destroy_process_group()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="small-moe")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    from moelab.parallel.local import run_local

    N = args.procs
    layouts = {
        f"1 process x {N} threads": (1, []),
        f"{N} processes, data parallel (replicated)": (N, []),
        f"{N} processes, expert parallel {N}": (N, [f"parallel.expert={N}"]),
        f"{N} processes, expert parallel {N} + FSDP2 shard {N}": (N, [f"parallel.expert={N}", f"parallel.data_shard={N}"]),
    }
    rows = {}
    for name, (procs, layout) in layouts.items():
        if procs == 1:
            res = run_layout(0, args.recipe, layout, N, args.steps, args.rounds)
        else:
            res = run_local(procs, run_layout, args.recipe, layout, 1, args.steps, args.rounds)[0]
        rows[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in res),
            "a2a_share": statistics.median(r["a2a_share"] for r in res),
        }
    base = next(iter(rows.values()))["tokens_per_s"]
    print(f"{args.recipe}: global batch from the recipe, {args.steps} steps x {args.rounds} rounds, median")
    print(f"{'layout':55s} {'tokens/s':>10s} {'vs 1 proc':>10s} {'all-to-all':>11s}")
    for name, r in rows.items():
        print(f"{name:55s} {r['tokens_per_s']:10,.0f} {r['tokens_per_s'] / base:9.2f}x {r['a2a_share']:10.1%}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
