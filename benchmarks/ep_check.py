"""The expert-parallel dispatcher on this machine's transport, under torchrun: each rank
holds n_experts / WORLD_SIZE experts and must give the same outputs and router
gradients as one layer holding all experts, on its own tokens; prints the differences
and forward+backward times of both. With one process it still runs every all-to-all
(to itself), which is what a single GPU can check of the NCCL path.

    torchrun --nproc_per_node N benchmarks/ep_check.py [--dtype bf16] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

from moelab import MoE, MoEConfig
from moelab.parallel import shard_experts


def timed(fn, rounds, sync):
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    full = MoE(MoEConfig(d_model=512, d_expert=1024, n_experts=8, top_k=2)).to(device, dtype)
    ep = copy.deepcopy(full)
    shard_experts(ep, dist.group.WORLD, rank, world)
    x = torch.randn(args.tokens, 512, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(rank))

    def run(layer):
        xi = x.clone().requires_grad_(True)
        y, stats = layer(xi)
        (y.float().square().mean() + stats.aux_loss).backward()
        return y.detach(), layer.router.weight.grad.detach().clone()

    (y_full, g_full), (y_ep, g_ep) = run(full), run(ep)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_full = timed(lambda: run(full), args.rounds, sync)
    t_ep = timed(lambda: run(ep), args.rounds, sync)
    dy = float((y_full.float() - y_ep.float()).abs().max())
    dg = float((g_full.float() - g_ep.float()).abs().max() / g_full.float().abs().max().clamp_min(1e-12))
    res = torch.tensor([dy, dg, t_full, t_ep], device=device, dtype=torch.float64)
    dist.all_reduce(res, op=dist.ReduceOp.MAX)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        print(f"ep_check: {world} rank(s), {name}, {args.dtype}, {args.tokens} tokens/rank, backend "
              f"{dist.get_backend()}: max |y_ep - y_one| {res[0]:.3g}, router grad rel. diff {res[1]:.3g}; "
              f"fwd+bwd {res[2] * 1e3:.2f} ms one layer, {res[3] * 1e3:.2f} ms expert-parallel")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
