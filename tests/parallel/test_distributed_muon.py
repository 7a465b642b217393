"""Distributed Muon over 2 and 4 real processes (gloo): under FSDP2, HSDP and expert parallelism each matrix is
orthogonalised by exactly one rank (counted: the ranks' counts add up to one process's) and sent to the ranks that
hold its shards, and the step lands on one process's weights. The same gradients go in everywhere: drawn whole, then
cut the way each layout holds its parameters."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_MOE  # noqa: E402
from launch import spawn  # noqa: E402

STEPS = 2  # the second step runs on the first one's momentum


def gradients(cfg):
    """name -> a gradient for every parameter of the single-process model, the same on every rank."""
    from moelab.model import Transformer

    g = torch.Generator().manual_seed(7)
    shapes = {n: p.shape for n, p in Transformer(cfg.model).named_parameters()}
    return [{n: torch.randn(s, generator=g) for n, s in sorted(shapes.items())} for _ in range(STEPS)]


def worker(rank, layout):
    from torch.distributed.tensor import DTensor, distribute_tensor

    from moelab.model import Transformer
    from moelab.parallel.mesh import close_parallel, init_parallel
    from moelab.parallel.parallelize import EXPERT_PREFIX, parallelize
    from moelab.parallel.state import canonical_name
    from moelab.run_config import load_config
    from moelab.train.optim import build_optimizer

    cfg = load_config("tiny-moe", [*TINY_MOE, *layout])
    par = init_parallel(cfg) if layout else None
    try:
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        ep, ep_rank = (par.layout.expert, par.layout.ep_rank) if par else (1, 0)
        if par is not None:
            parallelize(model, par)
        opt = build_optimizer(model, cfg.optim)
        for grads in gradients(cfg):
            for n, p in model.named_parameters():
                full = grads[canonical_name(n)]
                if EXPERT_PREFIX in n and ep > 1:  # this rank's slice of the experts
                    full = full.chunk(ep)[ep_rank]
                p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
            opt.step()
        weights = {}
        for n, p in model.named_parameters():
            w = p.full_tensor() if isinstance(p, DTensor) else p
            weights[canonical_name(n)] = (ep_rank if EXPERT_PREFIX in n else None, ep, w.detach().numpy().copy())
        return opt.ns_matrices, weights
    finally:
        close_parallel(par)


LAYOUTS = {
    # dense weights FSDP2-sharded over 2 ranks (owners among them); experts split 2 ways, each whole on its rank
    "ep=2 x fsdp2, 2 ranks": (2, ["parallel.expert=2", "parallel.data_shard=2"]),
    # dense weights HSDP 2 x 2 (owners among all 4); each expert slice sharded over its 2 edp ranks (owners there)
    "ep=2 x hsdp 2x2, 4 ranks": (4, ["parallel.expert=2", "parallel.data_shard=2", "parallel.data_replicate=2"]),
}


@pytest.fixture(scope="module")
def one_process():
    return worker(0, [])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_matrix_has_one_owner_and_the_step_equals_one_process(one_process, name):
    world, layout = LAYOUTS[name]
    count_one, weights_one = one_process
    assert count_one == STEPS * 2 * (4 + 3 * 4)  # per step and layer: 4 attention matrices, 3 stacks of 4 experts
    results = spawn(world, worker, layout)
    counts = [c for c, _ in results]
    assert sum(counts) == count_one, counts  # iterated once in all, not once per rank
    assert max(counts) < count_one and min(counts) > 0, counts  # and the work is spread
    for _, weights in results:
        for n, (ep_rank, ep, w) in weights.items():
            ref = weights_one[n][2]
            if ep_rank is not None and ep > 1:
                ref = ref[ep_rank * ref.shape[0] // ep : (ep_rank + 1) * ref.shape[0] // ep]
            torch.testing.assert_close(torch.from_numpy(w), torch.from_numpy(ref), atol=1e-5, rtol=0, msg=n)
