"""MoE layer speed against a dense SwiGLU FFN of the same active FLOPs.

Times forward + backward of: moelab.MoE; a dense SwiGLU with hidden = top_k * d_expert
(the physical limit: same matmul FLOPs, no routing; ratio 1.0); and Hugging Face's
Mixtral and Qwen3-MoE blocks with their `eager` and `grouped_mm` expert backends.
Implementations are interleaved round by round and the median time is reported, so
machine noise hits all of them alike.

    python benchmarks/moe_layer.py [--threads 2] [--rounds 7] [--dtype fp32] [--malloc tuned|default]

`--malloc tuned` (the default, as in `moelab train`) keeps freed memory in the heap
(`moelab.runtime.tune_cpu_allocator`); `default` leaves glibc as it is.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from moelab import MoE, MoEConfig
from moelab.runtime import tune_cpu_allocator
from moelab.model.blocks import SwiGLU

SHAPES = [  # (label, d_model, d_expert, n_experts, top_k, tokens)
    ("8x top-2", 512, 1024, 8, 2, 4096),
    ("64x top-8", 512, 256, 64, 8, 4096),
    ("8x top-2, 512 tok", 512, 1024, 8, 2, 512),
    ("64x top-8, 512 tok", 512, 256, 64, 8, 512),
]


def hf_blocks(D, F, E, K):
    """HF blocks keyed by name; empty if transformers is absent."""
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
    except ImportError:
        return {}
    out = {}
    for impl in ("eager", "grouped_mm"):
        mc = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                           experts_implementation=impl)
        qc = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                            experts_implementation=impl)
        out[f"HF Mixtral {impl}"] = MixtralSparseMoeBlock(mc)
        out[f"HF Qwen3-MoE {impl}"] = Qwen3MoeSparseMoeBlock(qc)
    for m in out.values():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return out


def step_fn(module, x, g, is_moelab):
    def run():
        for p in module.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        y = y[0] if is_moelab else y
        y.backward(g)
    return run


def bench_shape(label, D, F, E, K, T, rounds, dtype, device, with_hf=True):
    torch.manual_seed(0)
    x = torch.randn(1, T, D, device=device, dtype=dtype)
    g = torch.randn(1, T, D, device=device, dtype=dtype)
    impls = {
        "dense SwiGLU (k*F)": (SwiGLU(D, K * F), False),
        "moelab.MoE": (MoE(MoEConfig(d_model=D, d_expert=F, n_experts=E, top_k=K)), True),
    }
    for name, block in (hf_blocks(D, F, E, K) if with_hf else {}).items():
        impls[name] = (block, False)
    fns = {}
    for name, (m, is_moelab) in impls.items():
        m.to(device=device, dtype=dtype)
        if isinstance(m, SwiGLU):
            m.reset_parameters(0.02, 0.02)
        fns[name] = step_fn(m, x, g, is_moelab)
        fns[name]()  # warm-up
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["dense SwiGLU (k*F)"]
    return [{"shape": label, "impl": n, "ms": 1e3 * med[n], "ratio": med[n] / base} for n in fns]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face blocks")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "tuned" and args.device == "cpu":
        tune_cpu_allocator()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = torch.device(args.device)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = []
    for s in shapes:
        rows += bench_shape(*s, rounds=args.rounds, dtype=dtype, device=device,
                            with_hf=not args.no_hf)
        print(f"# {s[0]} done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
        return
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"| shape | implementation | ms (fwd+bwd, median of {args.rounds}) | × dense |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['ms']:.1f} | {r['ratio']:.2f} |")
    print(f"\n{dev}, {args.dtype}, {args.threads} threads, malloc {args.malloc}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
