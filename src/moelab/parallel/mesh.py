"""Process layout of a multi-process run: which rank holds which experts and which shard
of the dense weights, as `DeviceMesh`es built from `parallel.*` and the torchrun world.

Every rank is a data-parallel rank (it reads its own slice of the global batch). The
expert-parallel dimension is carved out of data parallelism (torchtitan's "dp2ep",
OLMo-core's expert mesh): ranks r with the same r // E form one expert-parallel group of
E consecutive ranks (the all-to-all stays on neighbouring devices), and hold all
n_experts between them; ranks with the same r % E hold the same experts and form the
expert-data-parallel group (W / E ranks), over which those experts are sharded (FSDP2).
The dense weights use the data mesh (replicate x shard); replicate x shard = W.

With a pipeline of P ranks (parallel.pipeline) the world is P x D: ranks r with the
same r // D hold the same stages (pipeline rank r // D) and form that stage's data
world of D ranks, laid out as above (pp is the outermost mesh dimension, as in
torchtitan); ranks with the same r % D form one pipeline (activations flow between
them).

`plan_layout` checks a layout against the world size without any collective, so a bad
layout is one clear error on every rank, never a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..errors import ConfigError
from ..run_config import MULTI_STAGE_SCHEDULES, RunConfig
from ..runtime import pick_device
from .failures import torchrun_world, watch_for_peer_failures
from .pipeline import split_layers


@dataclass(frozen=True)
class Layout:
    """Degrees of one run: world = replicate x shard (dense weights) = expert x world / expert (experts)."""

    world: int
    rank: int
    expert: int
    shard: int
    replicate: int
    pipeline: int = 1  # pipeline ranks; world = pipeline x replicate x shard

    @property
    def data(self) -> int:
        """Data-parallel ranks per pipeline stage (the world when there is no pipeline)."""
        return self.replicate * self.shard

    @property
    def pp_rank(self) -> int:
        """Which pipeline rank (which stages) this process holds."""
        return self.rank // self.data

    @property
    def dp_rank(self) -> int:
        """This rank's position among its stage's data-parallel ranks: the slice of each batch it reads."""
        return self.rank % self.data

    @property
    def ep_rank(self) -> int:
        """This rank's position in its expert-parallel group: it holds expert slice ep_rank."""
        return self.rank % self.expert


def plan_layout(cfg: RunConfig, world: int, rank: int) -> Layout:
    """The layout `parallel.*` asks for in a world of `world` processes; ConfigError naming
    the field when a degree does not fit (checked locally: no collective is called)."""
    p = cfg.parallel
    p.validate()
    if p.pipeline > 1:
        return _plan_pipeline(cfg, world, rank)
    E, shard, rep = _plan_data(cfg, world, "the world size")
    return Layout(world=world, rank=rank, expert=E, shard=shard, replicate=rep)


def _plan_data(cfg: RunConfig, data: int, where: str) -> tuple[int, int, int]:
    """(expert, shard, replicate) degrees over `data` data-parallel ranks (`where` says,
    in messages, where that number comes from)."""
    what = f"{data} data-parallel processes ({where})"
    p, moe = cfg.parallel, cfg.model.moe
    E = p.expert
    shard, rep = p.data_shard, p.data_replicate
    if shard == 0 and rep == 0:
        shard, rep = 1, data
    elif shard == 0:
        if data % rep:
            raise ConfigError(f"parallel.data_replicate={rep} does not divide the {what}")
        shard = data // rep
    elif rep == 0:
        if data % shard:
            raise ConfigError(f"parallel.data_shard={shard} does not divide the {what}")
        rep = data // shard
    if shard * rep != data:
        raise ConfigError(
            f"parallel.data_shard x parallel.data_replicate = {shard} x {rep} = {shard * rep}, "
            f"but there are {what}: they must multiply to that number"
        )
    if E > 1:
        if moe is None:
            raise ConfigError(f"parallel.expert={E}: the model has no MoE layers (model.moe is null)")
        if moe.n_experts % E:
            raise ConfigError(f"parallel.expert={E} does not divide model.moe.n_experts={moe.n_experts}")
        if data % E:
            raise ConfigError(
                f"parallel.expert={E} does not divide the {what}; launch a multiple of {E} data-parallel processes"
            )
    if cfg.train.batch_size % data:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) does not split evenly over "
            f"{data} data-parallel ranks"
        )
    return E, shard, rep


def _plan_pipeline(cfg: RunConfig, world: int, rank: int) -> Layout:
    """P pipeline ranks of D = world / P data-parallel ranks each, V stages per pipeline
    rank (checked here, before any collective)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    P, V = p.pipeline, p.virtual_stages
    if world % P:
        raise ConfigError(
            f"parallel.pipeline={P} does not divide the world size {world}: launch a multiple of {P} processes "
            f"(pipeline x data-parallel ranks)"
        )
    D = world // P
    E, shard, rep = _plan_data(cfg, D, f"world size {world} / parallel.pipeline={P}")
    if m.n_layers < P * V:
        raise ConfigError(f"parallel.pipeline={P} x virtual_stages={V} stages exceed model.n_layers={m.n_layers}")
    split_layers(m.n_layers, P * V, p.pipeline_split)  # ConfigError naming parallel.pipeline_split
    if t.grad_accum < P:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} micro-batches cannot fill a pipeline of {P} stages: use at least {P}"
        )
    if p.pipeline_schedule in MULTI_STAGE_SCHEDULES and t.grad_accum % P:
        raise ConfigError(
            f"{p.pipeline_schedule} needs train.grad_accum (micro-batches) divisible by parallel.pipeline={P}"
        )
    if m.tie_embeddings:
        raise ConfigError("parallel.pipeline > 1 needs model.tie_embeddings=false (embedding and head on two stages)")
    if t.activation_checkpointing and m.moe is not None and m.moe.balance_scope == "global":
        raise ConfigError(
            "parallel.pipeline > 1 with train.activation_checkpointing and model.moe.balance_scope=global is not "
            "supported yet (the recomputed forward would count its micro-batch twice)"
        )
    if t.compile and D > 1:
        raise ConfigError("parallel.pipeline > 1 with data parallelism does not take train.compile=true yet")
    return Layout(world=world, rank=rank, expert=E, shard=shard, replicate=rep, pipeline=P)


@dataclass
class Parallel:
    """A live layout: the data mesh for dense weights, the expert mesh (ep, edp) and groups."""

    layout: Layout
    device: torch.device
    dense_mesh: DeviceMesh  # 1-D (shard) or 2-D (replicate, shard): fully_shard's mesh
    expert_mesh: DeviceMesh  # 2-D ("ep", "edp"): experts split over ep, each slice sharded over edp
    owns_group: bool = False  # moelab created the process group (and destroys it at the end)
    edp_mesh: DeviceMesh | None = None  # expert_mesh["edp"] (kept: a pipeline's expert mesh is itself a slice)
    dp_group: dist.ProcessGroup | None = None  # this stage's data-parallel ranks (None: the whole world)
    pp_group: dist.ProcessGroup | None = None  # the ranks of this rank's pipeline (parallel.pipeline > 1)

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.layout.rank

    @property
    def world(self) -> int:
        """The number of processes."""
        return self.layout.world

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, config and manifests."""
        return self.layout.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """The expert-parallel group: the ranks whose experts together make all n_experts."""
        return self.expert_mesh.get_group("ep")

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def build_meshes(layout: Layout, device: torch.device) -> Parallel:
    """The meshes of `layout` (every rank must call this, in the same order)."""
    if layout.pipeline > 1:
        return _pipeline_meshes(layout, device)
    W, E = layout.world, layout.expert
    ranks = torch.arange(W)
    if layout.replicate == 1:
        dense = DeviceMesh(device.type, ranks, mesh_dim_names=("dp_shard",))
    else:
        dense = DeviceMesh(
            device.type, ranks.view(layout.replicate, layout.shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    # row i of the (ep, edp) mesh: the ranks holding expert slice i; column j: one EP group
    experts = DeviceMesh(device.type, ranks.view(W // E, E).t().contiguous(), mesh_dim_names=("ep", "edp"))
    return Parallel(layout, device, dense, experts, edp_mesh=experts["edp"])


def _pipeline_meshes(layout: Layout, device: torch.device) -> Parallel:
    """pp x data meshes: each mesh has pp outermost, and this rank keeps its stage's slice."""
    P, D, E, R = layout.pipeline, layout.data, layout.expert, layout.replicate
    grid = torch.arange(layout.world).view(P, D)
    if R == 1:
        dense_all = DeviceMesh(device.type, grid, mesh_dim_names=("pp", "dp_shard"))
        dense = dense_all["dp_shard"]
    else:
        names = ("pp", "dp_replicate", "dp_shard")
        dense_all = DeviceMesh(device.type, grid.view(P, R, layout.shard), mesh_dim_names=names)
        dense = dense_all["dp_replicate", "dp_shard"]
    by_slice = grid.view(P, D // E, E).transpose(1, 2).contiguous()  # (pp, ep, edp), as build_meshes per stage
    experts_all = DeviceMesh(device.type, by_slice, mesh_dim_names=("pp", "ep", "edp"))
    groups = DeviceMesh(device.type, grid, mesh_dim_names=("pp", "dp"))
    return Parallel(
        layout,
        device,
        dense,
        experts_all["ep", "edp"],
        edp_mesh=experts_all["edp"],
        dp_group=groups.get_group("dp"),
        pp_group=groups.get_group("pp"),
    )


def init_parallel(cfg: RunConfig) -> Parallel | None:
    """Join the torchrun world and build its meshes; None in a plain single process.
    The layout is checked before the process group is created."""
    env = torchrun_world()
    if env is None:
        p = cfg.parallel
        if p.expert > 1 or p.data_shard > 1 or p.data_replicate > 1 or p.pipeline > 1:
            raise ConfigError(
                f"parallel.expert={p.expert}, data_shard={p.data_shard}, data_replicate={p.data_replicate}, "
                f"pipeline={p.pipeline} need several processes: launch with "
                "`torchrun --nproc_per_node N -m moelab train ...`"
            )
        return None
    rank, local_rank, world = env
    layout = plan_layout(cfg, world, rank)
    watch_for_peer_failures()  # a rank another rank's failure leaves waiting exits with that rank's line
    if cfg.train.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"train.device={cfg.train.device}: under torchrun each process takes cuda:LOCAL_RANK; use auto, cuda or cpu"
        )
    device = pick_device(cfg.train.device)  # the same checks (and messages) as one process
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        timeout = datetime.timedelta(seconds=float(os.environ.get("MOELAB_DIST_TIMEOUT_S", "600")))
        dist.init_process_group(backend, timeout=timeout)
    par = build_meshes(layout, device)
    par.owns_group = owns
    return par


def close_parallel(par: Parallel | None) -> None:
    """Leave the process group at the end of a distributed command, if moelab joined it
    (a caller that created the group keeps it)."""
    if par is not None and par.owns_group and dist.is_initialized():
        dist.destroy_process_group()
