"""Expert parallelism over 2 real processes (gloo) equals one process holding all experts:
outputs, aux losses and every gradient, dropless and capacity-limited, also when one
expert or a whole rank's experts get no token. Each test times out instead of hanging."""
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab import MoE, MoEConfig

sys.path.insert(0, str(Path(__file__).parent))
from launch import spawn  # noqa: E402

D, E, K, T = 16, 8, 2, 24


def make_moe(capacity, bias):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_expert=12, n_experts=E, top_k=K, capacity_factor=capacity,
                        bias_update_rate=0.01, lb_coef=0.01, z_coef=0.001))
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor(bias))
    return moe


def inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def loss_of(moe, x, proj):
    y, stats = moe(x)
    return (y * proj).sum() + stats.aux_loss, y, stats


def worker(rank, out, capacity, bias):
    import torch.distributed as dist

    from moelab.parallel import shard_experts

    world = 2
    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        moe = make_moe(capacity, bias)
        shard_experts(moe, dist.group.WORLD, rank, world)
        x, proj = inputs(rank)
        x.requires_grad_(True)
        loss, y, stats = loss_of(moe, x, proj)
        loss.backward()
        ex = moe.experts.local
        save_file({"y": y.detach(), "x_grad": x.grad, "router_grad": moe.router.weight.grad,
                   "lb": stats.lb_loss.detach(), "z": stats.z_loss.detach(),
                   **{f"{n}_grad": getattr(ex, n).grad for n in ("w_gate", "w_up", "w_down")}},
                  os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("capacity", [None, 1.0])
@pytest.mark.parametrize("case", ["all", "one expert idle", "one rank idle"])
def test_two_ranks_equal_one_process(tmp_path, capacity, case):
    bias = [0.0] * E
    if case == "one expert idle":
        bias[3] = -1e4
    elif case == "one rank idle":  # rank 1 holds experts 4..7: none is ever chosen
        bias[4:] = [-1e4] * 4
    spawn(2, worker, str(tmp_path), capacity, bias, timeout=120)
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    shapes = {n: getattr(make_moe(capacity, bias).experts, n).shape for n in ("w_gate", "w_up", "w_down")}
    expert_grads = {n: torch.zeros(shape) for n, shape in shapes.items()}
    for r in range(2):  # the reference: all experts in one process, on this rank's tokens
        moe = make_moe(capacity, bias)
        x, proj = inputs(r)
        x.requires_grad_(True)
        loss, y, stats = loss_of(moe, x, proj)
        loss.backward()
        torch.testing.assert_close(got[r]["y"], y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["router_grad"], moe.router.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["lb"], stats.lb_loss.detach())
        torch.testing.assert_close(got[r]["z"], stats.z_loss.detach())
        for n in expert_grads:
            expert_grads[n] += getattr(moe.experts, n).grad
    # each rank's experts got the gradient of every rank's tokens routed to them
    for r in range(2):
        for n, g in expert_grads.items():
            torch.testing.assert_close(got[r][f"{n}_grad"], g[r * 4:(r + 1) * 4], atol=1e-5, rtol=1e-5)
    if case == "one rank idle":
        assert float(got[1]["w_up_grad"].abs().sum()) == 0.0
