"""Newton-Schulz seconds per rank of Muon's step under FSDP2: one process against N gloo processes, each with one
thread, the same model and gradients. Under FSDP2 every sharded matrix has one owner rank that iterates it (the
others receive the result), so each rank's Newton-Schulz time should fall towards 1/N of one process's; the step's
wall time also holds the gathers and the sends.

    python benchmarks/distributed_muon.py [--recipe tiny-moe] [--world 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab.parallel.local import run_local


def worker(rank: int, recipe: str, world: int, steps: int) -> dict:
    """Time `steps` optimizer steps; the seconds inside the Newton-Schulz iteration and the whole step, per step."""
    import moelab.train.muon as muon
    from moelab.model import Transformer
    from moelab.parallel.mesh import close_parallel, init_parallel
    from moelab.parallel.parallelize import parallelize
    from moelab.run_config import load_config
    from moelab.train.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = load_config(recipe, ["optim.name=muon", *([f"parallel.data_shard={world}"] if world > 1 else [])])
    par = init_parallel(cfg) if world > 1 else None
    spent = [0.0]
    real = muon.orthogonalise

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    muon.orthogonalise = timed
    try:
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        if par is not None:
            parallelize(model, par)
        opt = build_optimizer(model, cfg.optim)
        x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()  # warm-up
        spent[0], walls = 0.0, []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            walls.append(time.perf_counter() - t0)
        return {"ns_s": spent[0] / steps, "step_s": statistics.median(walls), "matrices": opt.ns_matrices}
    finally:
        muon.orthogonalise = real
        close_parallel(par)


def main(argv=None):
    """Print one process's and each of N processes' Newton-Schulz and step seconds."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny-moe")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    one = run_local(1, worker, args.recipe, 1, args.steps)[0]
    many = run_local(args.world, worker, args.recipe, args.world, args.steps)
    print("| processes | rank | Newton-Schulz ms/step | optimizer step ms | x one process (Newton-Schulz) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| 1 | 0 | {one['ns_s'] * 1e3:.1f} | {one['step_s'] * 1e3:.1f} | 1.00 |")
    for r, res in enumerate(many):
        print(f"| {args.world} (FSDP2) | {r} | {res['ns_s'] * 1e3:.1f} | {res['step_s'] * 1e3:.1f} | "
              f"{res['ns_s'] / one['ns_s']:.2f} |")  # fmt: skip
    print(f"\n{args.recipe}, one thread per process, gloo, median of {args.steps} steps, torch {torch.__version__}")


if __name__ == "__main__":
    main()
