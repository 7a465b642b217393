"""Memory of a real multi-process training step, per rank, read off its tensors: what
`moelab memory --devices N --expert-parallel E --zero 0|3 --measure` compares with the
plan. ZeRO-3 is FSDP2 over all ranks (experts over their expert-data-parallel ranks);
ZeRO-0 replicates the dense weights (FSDP2 over a replicate mesh)."""

from __future__ import annotations

import resource
from dataclasses import replace

import torch
import torch.distributed as dist

from ...config import ConfigError, ModelConfig
from ...model import Transformer
from ...parallel.local import run_local
from ...parallel.mesh import Layout, build_meshes
from ...parallel.parallelize import finish_gradients, parallelize
from ...run_config import OptimConfig
from ...runtime import is_dtensor
from ...train.optim import build_optimizer
from .plan import MemoryPlan, measure_activation_bytes, measure_memory, plan_memory
from .setup import MemorySetup


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if is_dtensor(t) else t
    return t.numel() * t.element_size()


def _measure_rank(
    rank: int,
    cfg: ModelConfig,
    setup: MemorySetup,
    steps: int,
    state: dict | None = None,
    tokens_RBS: torch.Tensor | None = None,
    optim: OptimConfig | None = None,
):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        shard, replicate = (world, 1) if setup.zero == 3 else (1, world)
        ep = setup.expert_parallel if cfg.moe is not None else 1
        par = build_meshes(Layout(world, rank, ep, shard, replicate), torch.device("cpu"))
        torch.manual_seed(0)
        model = Transformer(cfg)
        if state is not None:  # a run's weights: its router's real, uneven routing
            model.load_state_dict(state)
        parallelize(model, par)
        opt = build_optimizer(model, replace(optim or OptimConfig(), lr=0.0 if state is not None else 1e-4))
        if tokens_RBS is not None:
            tokens = tokens_RBS[rank]
        else:
            g = torch.Generator().manual_seed(rank)
            S = setup.seq_len or cfg.max_seq_len
            tokens = torch.randint(0, cfg.vocab_size, (setup.micro_batch, S + 1), generator=g)
        act = grads = 0
        for _ in range(steps):
            act, out = measure_activation_bytes(model, tokens)
            out.loss.backward()
            finish_gradients(model, par, 1.0)
            grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {
            "params": sum(_local_bytes(p) for p in model.parameters()),
            "grads": grads,
            "optimizer": sum(_local_bytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
            "activations": act,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    finally:
        dist.destroy_process_group()


def measure_parallel(
    cfg: ModelConfig,
    setup: MemorySetup,
    *,
    steps: int = 2,
    state: dict | None = None,
    tokens_RBS: torch.Tensor | None = None,
    optim: OptimConfig | None = None,
) -> list[dict[str, int]]:
    """Each rank's measured bytes (params, grads, optimizer, activations, peak RSS) in a
    real `setup.devices`-process gloo run on this machine (experts split as `setup` says, ZeRO 0 or 3): random
    tokens and a seeded init, or a run's weights (`state`, left unchanged: learning rate 0) on its own text, rank r
    reading `tokens_RBS[r]` (B sequences of S + 1 tokens); `optim` as the run trains (AdamW when None)."""
    return run_local(setup.devices, _measure_rank, cfg, setup, steps, state, tokens_RBS, optim)


def plan_and_measure(cfg, setup: MemorySetup, *, measure: bool = False) -> tuple[list[MemoryPlan], dict[str, dict]]:
    """Plans for a run config's model and, for an MoE, its dense twin, both under the config's optimizer; measured
    here on request."""
    models = [(cfg.name, cfg.model)]
    if cfg.model.moe is not None:
        models.append((f"{cfg.name} dense twin", cfg.model.dense_twin()))
    try:
        plans = [plan_memory(m, setup, name=n, optim=cfg.optim) for n, m in models]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    measured = {}
    if measure:
        if setup.dtype != "fp32" or setup.activation_checkpointing:
            raise ConfigError("--measure runs on this machine's CPU: use --dtype fp32, no activation checkpointing")
        devices = setup.devices
        if devices > 1 and setup.zero not in (0, 3):
            raise ConfigError(
                f"--measure with --devices {devices}: FSDP2 runs ZeRO 0 (replicated) or 3, not {setup.zero}"
            )
        for (n, m), p in zip(models, plans, strict=True):
            if p.bytes["total"] * devices > 8 * 1024**3:
                raise ConfigError(
                    f"--measure: {n} needs about {p.bytes['total'] * devices / 1024**3:.0f} GiB over "
                    f"{devices} process(es); measure a smaller recipe or batch"
                )
            if devices == 1:
                measured[n] = measure_memory(m, setup, optim=cfg.optim)
            else:
                measured[n] = measure_parallel(m, setup, optim=cfg.optim)[0]
    return plans, measured
