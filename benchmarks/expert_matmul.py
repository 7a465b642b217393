"""Where the MoE's forward and backward lose to their arithmetic, at the row counts small recipes give each expert.

Part 1, the experts: forward + backward of E SwiGLU experts over rows grouped by expert (n rows each, balanced),
against the same FLOPs as one dense SwiGLU of hidden F over the E*n rows (the physical limit, x 1.00):
- grouped_mm: moelab's default on CPU fp32 (`torch.nn.functional.grouped_mm`, one call per projection);
- loop: one F.linear per expert (`GroupedExperts(backend="loop")`);
- bmm: the rows padded to a capacity (here: exactly n) and one torch.bmm per projection - the layout of
  capacity-factor MoEs (Switch, GShard), which pays for padding when loads are uneven;
and, apart, moelab's whole `GroupedExperts` call (gathering each row from its token, the routing weights, the
scatter-add back), whose excess over grouped_mm is what the layer adds around the matmuls.
Part 2, the router and its losses (linear, softmax, top-k, load-balancing and z-loss), forward + backward, eager
against `torch.compile` (static shapes: the router has none that depend on the data), and the compilation's seconds.

    python benchmarks/expert_matmul.py [--threads 2] [--rounds 7]

Every way is timed round by round, interleaved, and the median is reported.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from moelab import MoEConfig
from moelab.moe.experts import GroupedExperts, gmm, loop_linear
from moelab.moe.losses import load_balancing_loss, router_z_loss
from moelab.moe.router import Router
from moelab.runtime import tune_cpu_allocator

IDEAL = "ideal: one dense SwiGLU, same FLOPs"
SHAPES = [  # (label, d_model, d_expert, n_experts, rows per expert)
    ("tiny-moe: 8 x 128x256, 512 rows", 128, 256, 8, 512),
    ("tiny-moe at 1/4 the batch: 128 rows", 128, 256, 8, 128),
    ("small-moe: 8 x 256x512, 1,024 rows", 256, 512, 8, 1024),
    ("fine-grained: 64 x 512x256, 64 rows", 512, 256, 64, 64),
]


def timed(fn, reps: int) -> float:
    """Median ms of fn over `reps` calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def expert_ways(D: int, Fh: int, E: int, n: int) -> dict:
    torch.manual_seed(0)
    x_ND = torch.randn(E * n, D, requires_grad=True)
    counts_E = torch.full((E,), n, dtype=torch.long)
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    m = GroupedExperts(E, D, Fh, "grouped_mm")
    m.reset_parameters(0.02, 0.02)
    ws = (m.w_gate, m.w_up, m.w_down)

    g_ND = torch.randn(E * n, D)  # a materialised incoming gradient, as the layer's scatter-add gives grouped_mm

    def swiglu(mm):  # the three projections only: rows already grouped, no gather, weights or scatter
        def run():
            h = F.silu(mm(x_ND, ws[0])) * mm(x_ND, ws[1])
            mm(h, ws[2]).backward(g_ND)

        return run

    sizes = [n] * E
    ways = {
        "grouped_mm": swiglu(lambda a, w: gmm(a, w, offs_E)),
        "loop": swiglu(lambda a, w: loop_linear(a, w, sizes)),
        "bmm (padded to capacity)": swiglu(lambda a, w: torch.bmm(a.view(E, n, -1), w.transpose(1, 2)).flatten(0, 1)),
    }
    dense = [torch.randn(Fh, D, requires_grad=True), torch.randn(Fh, D, requires_grad=True),
             torch.randn(D, Fh, requires_grad=True)]

    def ideal():
        h = F.silu(F.linear(x_ND, dense[0])) * F.linear(x_ND, dense[1])
        F.linear(h, dense[2]).backward(g_ND)

    ways[IDEAL] = ideal
    token_N, w_N = torch.arange(E * n), torch.ones(E * n)

    def layer():  # moelab's GroupedExperts as the layer calls it: gather rows, grouped_mm, weights, scatter-add
        m(x_ND, token_N, w_N, counts_E).backward(g_ND)

    ways["grouped_mm + gather, routing weights, scatter-add (moelab's GroupedExperts)"] = layer
    return ways


def router_ways(D: int, E: int, K: int, T: int) -> tuple[dict, float]:
    cfg = MoEConfig(d_model=D, d_expert=4 * D, n_experts=E, top_k=K)
    router = Router(cfg)
    x_TD = torch.randn(T, D, requires_grad=True)

    def losses(x_TD):
        r = router(x_TD)
        lb = load_balancing_loss(probs_TE=r.probs_TE, expert_idx_TK=r.expert_idx_TK, n_experts=E)
        return lb + router_z_loss(logits_TE=r.logits_TE) + r.weights_TK.sum()

    compiled = torch.compile(losses)
    t0 = time.perf_counter()
    compiled(x_TD).backward()
    compile_s = time.perf_counter() - t0
    return {"eager": lambda: losses(x_TD).backward(), "torch.compile": lambda: compiled(x_TD).backward()}, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5, help="calls per way per round")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    print("| experts | way | ms (fwd+bwd) | x ideal |")
    print("|---|---|---:|---:|")
    for label, D, Fh, E, n in SHAPES:
        ways = expert_ways(D, Fh, E, n)
        for fn in ways.values():
            fn()  # warm-up
        ms = {w: [] for w in ways}
        for _ in range(args.rounds):
            for w, fn in ways.items():
                ms[w].append(timed(fn, args.reps))
        med = {w: statistics.median(v) for w, v in ms.items()}
        ideal = med[IDEAL]
        for w, v in med.items():
            print(f"| {label} | {w} | {v:.2f} | {v / ideal:.2f} |")
    print("\n| router + losses (T tokens) | way | ms (fwd+bwd) | x eager |")
    print("|---|---|---:|---:|")
    for D, E, K, T in ((128, 8, 2, 2048), (256, 8, 2, 4096), (512, 64, 8, 4096)):
        ways, compile_s = router_ways(D, E, K, T)
        for fn in ways.values():
            fn()
        ms = {w: [] for w in ways}
        for _ in range(args.rounds):
            for w, fn in ways.items():
                ms[w].append(timed(fn, args.reps))
        med = {w: statistics.median(v) for w, v in ms.items()}
        for w, v in med.items():
            extra = f" (compiled in {compile_s:.1f} s)" if w == "torch.compile" else ""
            print(f"| D {D}, {E} experts top-{K}, {T:,} tokens | {w}{extra} | {v:.3f} | {v / med['eager']:.2f} |")
    print(f"\n{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"median of {args.rounds} rounds x {args.reps} calls")


if __name__ == "__main__":
    main()
