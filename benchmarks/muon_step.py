"""Muon's optimizer step on an MoE recipe and its dense twin: milliseconds per step for each way of orthogonalising,
side by side in one run, and the singular-value band each leaves on the model's own gradients.

Ways (`--ways`):
- per-param-jordan: one call per parameter, Jordan's quintic, unfused matmuls (moelab before the batched iteration);
- jordan: every matrix of one shape in one call, fused products, Gram iteration where cheaper, Jordan's quintic, fp32
  (`optim.ns_dtype=fp32`);
- polar_express: the same with Polar Express's per-step quintics (the default);
- stacked: jordan with each expert stack orthogonalised as the layer's one wide matrix
  (`optim.muon_experts=stacked`);
- bf16-jordan: the same iteration in bf16 (`optim.ns_dtype=bf16`, what `auto` takes on GPUs and CPUs with AMX);
- adamw-experts: AdamW's update for the routed experts, Muon for the rest (`optim.muon_experts=adamw`);
- dion-experts: Dion's rank-r orthonormal update for the routed experts, r a quarter of each expert matrix's smaller
  side (`optim.muon_experts=dion`); its band is that of the r directions it takes (the rest are zero).

The gradients are real (one backward of the recipe's batch of random tokens); each round times `--steps` optimizer
steps of every (recipe, way) in turn, so a slow spell hits all alike; the median round counts.

    python benchmarks/muon_step.py [--moe tiny-moe] [--threads 2] [--rounds 5] [--steps 5] [--device cuda]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import moelab.train.dion as dion
import moelab.train.muon as muon
from moelab import Transformer
from moelab.analysis.memory.plan import dense_twin
from moelab.run_config import load_config
from moelab.train.optim import _stack_axis, build_optimizer

JORDAN = (3.4445, -4.7750, 2.0315)
ORTHOGONALISED = muon._orthogonalised  # moelab's own, whatever a way puts in its place


def per_param_jordan(updates, axes, steps, kind, dtype=torch.float32):
    """moelab's orthogonalisation before batching: each parameter alone, unfused, Jordan's quintic."""
    out = []
    for g in updates:
        x = g.float()
        tall = x.size(-2) > x.size(-1)
        x = x.mT if tall else x
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)
        a, b, c = JORDAN
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        out.append((x.mT if tall else x).to(g.dtype))
    return out, sum(g.numel() // (g.size(-1) * g.size(-2)) for g in updates)


WAYS = {"per-param-jordan": ("jordan", per_param_jordan), "jordan": ("jordan", None),
        "polar_express": ("polar_express", None), "stacked": ("jordan", None), "bf16-jordan": ("jordan", None),
        "adamw-experts": ("jordan", None), "dion-experts": ("jordan", None)}  # fmt: skip


def setup(cfg, model_cfg, kind, experts, ns_dtype="fp32", device="cpu"):
    """The model with one backward's gradients, and its optimizer."""
    cfg.optim.ns_coeffs = kind
    cfg.optim.muon_experts = experts
    cfg.optim.ns_dtype = ns_dtype
    torch.manual_seed(0)
    model = Transformer(model_cfg).to(device)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1), device=device)
    model(x[:, :-1], x[:, 1:]).loss.backward()
    return model, opt


def time_steps(opt, fn, steps: int) -> float:
    """Milliseconds per optimizer step, with `fn` in place of moelab's orthogonalisation if given."""
    original = muon._orthogonalised
    if fn is not None:
        muon._orthogonalised = fn
    try:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync()  # a GPU's steps are queued: the time is when they are done
        return (time.perf_counter() - t0) * 1e3 / steps
    finally:
        muon._orthogonalised = original


def main(argv=None):
    """Time every way on the MoE and its dense twin, side by side; print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", default="tiny-moe")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["optim.name=muon", *args.set]
    base = load_config(args.moe, overrides)
    models = {"moe": base.model, "dense twin": dense_twin(base.model)}
    ways = args.ways.split(",")
    runs = {}
    for m, model_cfg in models.items():
        for w in ways:
            kind, fn = WAYS[w]
            experts = {"stacked": "stacked", "adamw-experts": "adamw", "dion-experts": "dion"}.get(w, "per_expert")
            ns_dtype = "bf16" if w == "bf16-jordan" else "fp32"
            model, opt = setup(load_config(args.moe, overrides), model_cfg, kind, experts, ns_dtype, args.device)
            runs[(m, w)] = (model, opt, fn)
            time_steps(opt, fn, 1)  # warm-up
    ms: dict = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (_, opt, fn) in runs.items():
            ms[k].append(time_steps(opt, fn, args.steps))
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"| way | {' | '.join(f'{m} ms' for m in models)} | moe / dense | experts' band | vs {ways[0]} (moe) |")
    print("|---|" + "---:|" * (len(models) + 3))
    for w in ways:
        model = runs[("moe", w)][0]
        names = [n for n, _ in model.named_parameters() if ".experts." in n]
        stacks = [dict(model.named_parameters())[n].grad for n in names]
        kind, fn = WAYS[w]
        if w == "adamw-experts":
            cells = " | ".join(f"{med[(m, w)]:.1f}" for m in models)
            print(f"| {w} | {cells} | {med[('moe', w)] / med[('dense twin', w)]:.2f} | (AdamW) | "
                  f"{med[('moe', ways[0])] / med[('moe', w)]:.2f}x |")  # fmt: skip
            continue
        axes = [_stack_axis(n) if w == "stacked" else None for n in names]
        if w == "dion-experts":  # a first step from a zero momentum, on copies of the state
            r = [dion.rank(g.shape, base.optim.dion_rank) for g in stacks]
            ortho = [dion.step(torch.zeros_like(g), g, dion.initial_basis(g.shape, base.optim.dion_rank, g.device),
                               base.optim.momentum) for g in stacks]  # fmt: skip
            sv = torch.cat([torch.linalg.svdvals(o.double())[..., :k].flatten() for o, k in zip(ortho, r, strict=True)])
        else:
            dtype = torch.bfloat16 if w == "bf16-jordan" else torch.float32
            ortho, _ = (fn or ORTHOGONALISED)(stacks, axes, base.optim.ns_steps, kind, dtype)
            sv = torch.cat([torch.linalg.svdvals(muon._stacked(o, a).double()).flatten() for o, a in zip(ortho, axes, strict=True)])
        cells = " | ".join(f"{med[(m, w)]:.1f}" for m in models)
        print(f"| {w} | {cells} | {med[('moe', w)] / med[('dense twin', w)]:.2f} | "
              f"[{float(sv.min()):.2f}, {float(sv.max()):.2f}] | "
              f"{med[('moe', ways[0])] / med[('moe', w)]:.2f}x |")  # fmt: skip
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"\n{args.moe}, {where}, {args.rounds} rounds x {args.steps} optimizer steps, torch {torch.__version__}")


if __name__ == "__main__":
    main()
