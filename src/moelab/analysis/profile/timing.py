"""Where a training step's time goes: `moelab profile`.

A model (a recipe's, or a run's checkpoint), its dense twin (equal active parameters, as
`ModelConfig.dense_twin` builds it) and - for an MoE - the same weights with the
routing forced to be balanced (`model.moe.router_override=balanced`) each run W warm-up
steps, N plain steps (timed with a clock) and N steps under `torch.profiler` with the
`moelab.phases` ranges on. Every profiler event's self time is given to one phase:

- forward: the innermost `moelab/` range around it (attention, router, permute, ...);
- backward: the phase of the forward op that made its autograd node - the profiler tags
  both with the same sequence number - so each phase gets a backward column too;
- gradients written into the parameters' .grad (autograd's AccumulateGrad nodes, which
  no forward op made) are "grad accum";
- time inside `moelab/forward`, `moelab/backward` or `moelab/step` but in no finer range
  is reported as "forward, other", "backward, other" (the autograd engine between nodes)
  and "step, other" (host syncs), never dropped, so the rows add up to the step.
- the optimizer step is split into "muon, matrices" (attention and dense FFN matrices),
  "muon, expert stacks" (or "dion, expert stacks" under optim.muon_experts=dion) and "adamw"
  (everything AdamW updates); "optimizer" keeps the rest
  (gradient clipping, reductions, zeroing).

Profiling slows a step (one record per op); the tables are scaled by plain / profiled
step time, so their totals are the unprofiled step time, and the overhead is reported.
On CUDA a phase's time is the device time of the kernels its ops launched; on CPU the
host time of its ops.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...config import ModelConfig
from ...data import Data, Sampler
from ...model import Transformer
from ...parallel.mesh import Parallel
from ...parallel.parallelize import all_reduce_floats, parallelize
from ...phases import LAYER, PREFIX, phase, recording
from ...run_config import RunConfig
from ...train.metrics import MoEWindow, TrainingMemory
from ...train.optim import build_optimizer
from ...train.setup import Run, autocast_ctx
from ...train.step import run_step
from ..memory.plan import dense_twin

# Row order of the tables: the step's pipeline, MoE phases where the dense FFN would be.
ROWS = (
    "data",
    "embedding",
    "norm",
    "attention",
    "ffn",
    "router",
    "permute",
    "experts",
    "shared experts",
    "combine",
    "all-to-all",
    "aux losses",
    "head",
    "loss",
    "grad accum",
    "optimizer",
    "muon, matrices",
    "muon, expert stacks",
    "dion, expert stacks",
    "adamw",
    "forward, other",
    "backward, other",
    "step, other",
)
MOE_ROWS = ("router", "permute", "experts", "shared experts", "combine", "all-to-all", "aux losses")
OTHER = {"forward": "forward, other", "backward": "backward, other", "step": "step, other"}
_BACKWARD_NODE = "autograd::engine::evaluate_function: "


@dataclass
class PhaseTable:
    """One variant's profile: ms per step by phase, forward and backward, as measured under
    the profiler (`fwd_ms`, `bwd_ms`) and the step times that scale them."""

    name: str
    steps: int
    tokens_per_step: int
    plain_ms: float  # unprofiled step, by the clock
    profiled_ms: float  # profiled step, by the clock
    phases_ms: float  # the profiler's events of a step, summed
    fwd_ms: dict[str, float] = field(default_factory=dict)
    bwd_ms: dict[str, float] = field(default_factory=dict)
    loads: list[list[float]] = field(default_factory=list)  # per MoE layer: mean rows per expert and step
    layers: list[dict[str, float]] = field(default_factory=list)  # per block: {row: forward + backward ms}
    # under torchrun: every rank's {"plain_ms", "fwd_ms", "bwd_ms"} (this table is rank 0's, the step the slowest's)
    ranks: list[dict] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)  # each clock-timed round's step; plain_ms is their median

    @property
    def spread_pct(self) -> float | None:
        """How far the timing rounds disagree: (slowest - fastest) / median, in percent; None with one round."""
        if len(self.round_ms) < 2:
            return None
        return (max(self.round_ms) - min(self.round_ms)) / self.plain_ms * 100

    @property
    def scale(self) -> float:
        """Profiled milliseconds -> unprofiled ones."""
        return self.plain_ms / self.phases_ms if self.phases_ms > 0 else 1.0

    def row_ms(self, row: str) -> float:
        """Forward + backward ms of one row, scaled to the unprofiled step."""
        return (self.fwd_ms.get(row, 0.0) + self.bwd_ms.get(row, 0.0)) * self.scale

    def to_json(self) -> dict:
        """The table as plain types, with the scaled rows and the tokens/s."""
        d = asdict(self)
        d["scale"] = self.scale
        d["spread_pct"] = self.spread_pct
        d["tokens_per_s"] = self.tokens_per_step / (self.plain_ms / 1e3)
        d["rows_ms"] = {r: self.row_ms(r) for r in ROWS if r in self.fwd_ms or r in self.bwd_ms}
        return d


def attribute(events, device_time: bool = False):
    """(forward ms by row, backward ms by row, ms of all step events, number of steps, and
    per block {row: forward + backward ms}) of a profile's events, per step of its
    `moelab/step` ranges (see the module docstring)."""

    def innermost(e, pred):
        while e is not None and not pred(e):
            e = e.cpu_parent
        return e

    def range_of(e) -> str | None:
        r = innermost(e, lambda a: a.name.startswith(PREFIX) and not a.name.startswith(PREFIX + LAYER))
        return r.name[len(PREFIX) :] if r is not None else None

    def layer_of(e) -> int | None:
        r = innermost(e, lambda a: a.name.startswith(PREFIX + LAYER))
        return int(r.name[len(PREFIX + LAYER) :]) if r is not None else None

    def node_of(e):
        return innermost(e, lambda a: a.name.startswith(_BACKWARD_NODE))

    made_by: dict[tuple[int, int], tuple[str, int | None]] = {}  # (thread, sequence number) -> (range, layer)
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(PREFIX) and node_of(e) is None:
            made_by.setdefault((e.thread, e.sequence_nr), (range_of(e) or "forward", layer_of(e)))
    steps = [e for e in events if e.name == PREFIX + "step"]
    in_step = {id(d) for s in steps for d in _subtree(s)}
    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}
    per_layer: dict[int, dict[str, float]] = {}  # layer -> row -> ms, forward and backward
    for e in events:
        node = node_of(e)
        if id(e) not in in_step and node is None:
            continue  # outside the profiled steps (profiler start-up)
        us = e.self_device_time_total if device_time else e.self_cpu_time_total
        if node is not None:
            if node.name.endswith("AccumulateGrad"):  # a leaf's .grad written: no forward op made it
                where, index = "grad accum", None
            else:
                where, index = made_by.get((node.fwd_thread, node.sequence_nr), ("backward", None))
            table = bwd
        else:
            where, index = range_of(e) or "step", layer_of(e)
            table = bwd if where == "backward" else fwd
        row = OTHER.get(where, where)
        table[row] = table.get(row, 0.0) + us / 1e3
        if index is not None:
            per_layer.setdefault(index, {})
            per_layer[index][row] = per_layer[index].get(row, 0.0) + us / 1e3
    n = max(len(steps), 1)
    total = sum(fwd.values()) + sum(bwd.values())
    layers = [{k: v / n for k, v in per_layer[i].items()} for i in sorted(per_layer)]
    return {k: v / n for k, v in fwd.items()}, {k: v / n for k, v in bwd.items()}, total / n, len(steps), layers


def _subtree(e):
    stack = [e]
    while stack:
        a = stack.pop()
        yield a
        stack.extend(a.cpu_children)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Session:
    """One variant ready to train: a fresh model (weights `state`, else a seeded init), its
    optimizer and sampler, at a constant LR (the peak: the schedule does not change a step's cost)."""

    def __init__(
        self,
        name: str,
        cfg: RunConfig,
        model_cfg: ModelConfig,
        state: dict | None,
        data: Data,
        device,
        par: Parallel | None = None,
    ):
        torch.manual_seed(cfg.train.seed)
        model = Transformer(model_cfg).to(device)
        if state is not None:
            model.load_state_dict(state)
        if par is not None:
            parallelize(model, par)
        model.train()
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model = model_cfg
        self.name, self.device = name, device
        opt = build_optimizer(model, cfg.optim)
        self.run = Run(run_cfg, Path("."), device, data, model, opt, TrainingMemory(device), par=par)
        self.sampler = Sampler(len(data.train), cfg.train.batch_size, cfg.train.seed)
        self.window, self.ctx, self.lr = MoEWindow(), autocast_ctx(cfg, device), cfg.optim.peak_lr

    def step(self):
        """One training step (its StepResult)."""
        return run_step(self.run, self.sampler, self.window, self.ctx, self.lr)

    def time(self, steps: int) -> tuple[float, int]:
        """(ms per step by the clock, tokens per step) over `steps` steps."""
        _sync(self.device)
        t0, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += self.step().tokens
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3 / steps, tokens // steps

    def profile(self, steps: int, plain_ms: float, tokens: int, trace: Path | None) -> PhaseTable:
        """`steps` steps under the profiler, phases on: the PhaseTable (the Chrome trace to `trace`)."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        loads: list[torch.Tensor] = []
        with recording(), torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                with phase("step"):
                    step_loads = list(self.step().loads or [])
                    _sync(self.device)
                loads = [a + b.float() for a, b in zip(loads, step_loads, strict=True)] if loads else step_loads
            profiled = (time.perf_counter() - t0) * 1e3 / steps
        if trace is not None:
            prof.export_chrome_trace(str(trace))
        fwd, bwd, total, n, layers = attribute(prof.events(), device_time=self.device.type == "cuda")
        per_step = [(x.float().cpu() / steps).tolist() for x in loads]
        return PhaseTable(self.name, n, tokens, plain_ms, profiled, total, fwd, bwd, per_step, layers=layers)


def profile_variants(
    cfg: RunConfig,
    state: dict | None,
    data: Data,
    device: torch.device,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    trace_dir: Path | None = None,
    par: Parallel | None = None,
    twin: bool = True,
) -> list[PhaseTable]:
    """Each of `variants(cfg.model)`: warm up, then `rounds` rounds of `steps` clock-timed
    steps taken in turn (so a slow spell of the machine hits every variant alike; the
    median round counts), then `steps` profiled steps. Traces go to TRACE_DIR/trace*.json.
    Under torchrun (`par`) every rank profiles its part of each step; a step's time is the
    slowest rank's and each table carries every rank's rows."""
    sessions = [
        Session(n, cfg, m, state if takes else None, data, device, par) for n, m, takes in variants(cfg.model, twin)
    ]
    for s in sessions:
        for _ in range(warmup):
            s.step()
    timed: dict[str, list[float]] = {s.name: [] for s in sessions}
    tokens: dict[str, int] = {}
    for _ in range(rounds):
        for s in sessions:
            ms, tokens[s.name] = s.time(steps)
            if par is not None:  # the step ends when its slowest rank does; tokens: the global batch
                ms, tok = all_reduce_floats([ms, float(tokens[s.name])], par, op="max")
                tokens[s.name] = int(tok)
            timed[s.name].append(ms)
    tables = []
    for i, s in enumerate(sessions):
        trace = None if trace_dir is None else trace_dir / ("trace.json" if i == 0 else f"trace-{slug(s.name)}.json")
        if par is not None and not par.is_main:
            trace = None
        table = s.profile(steps, sorted(timed[s.name])[rounds // 2], tokens[s.name], trace)
        table.round_ms = sorted(timed[s.name])
        if par is not None:
            table.ranks = _every_rank(table, par)
        tables.append(table)
    return tables


def _every_rank(t: PhaseTable, par: Parallel) -> list[dict]:
    """Each rank's clock and rows, gathered with one sum over a rank-by-row table."""
    width = 2 + 2 * len(ROWS)
    mine = [t.profiled_ms, t.phases_ms, *(t.fwd_ms.get(r, 0.0) for r in ROWS), *(t.bwd_ms.get(r, 0.0) for r in ROWS)]
    flat = [0.0] * (width * par.world)
    flat[par.rank * width : (par.rank + 1) * width] = mine
    got = all_reduce_floats(flat, par, op="sum")
    out = []
    for r in range(par.world):
        row = got[r * width : (r + 1) * width]
        fwd, bwd = row[2 : 2 + len(ROWS)], row[2 + len(ROWS) :]
        out.append({
            "profiled_ms": row[0],
            "phases_ms": row[1],
            "fwd_ms": {k: v for k, v in zip(ROWS, fwd, strict=True) if v},
            "bwd_ms": {k: v for k, v in zip(ROWS, bwd, strict=True) if v},
        })  # fmt: skip
    return out


def slug(name: str) -> str:
    """'moe, balanced' -> 'moe-balanced'."""
    return "-".join(name.replace(",", " ").split())


def balanced(model_cfg: ModelConfig) -> ModelConfig:
    """The same model with routing forced to even loads (combine weights still the router's)."""
    out = copy.deepcopy(model_cfg)
    assert out.moe is not None
    out.moe.router_override = "balanced"
    return out


def variants(model_cfg: ModelConfig, twin: bool = True) -> list[tuple[str, ModelConfig, bool]]:
    """(name, model config, whether it takes the profiled model's weights) for a model: an
    MoE, its dense twin (unless `twin` is False) and the MoE with balanced routing; a
    dense model alone."""
    if model_cfg.moe is None:
        return [("dense", model_cfg, True)]
    if not twin:
        return [("moe", model_cfg, True), ("moe, balanced", balanced(model_cfg), True)]
    return [
        ("moe", model_cfg, True),
        ("dense twin", dense_twin(model_cfg), False),
        ("moe, balanced", balanced(model_cfg), True),
    ]
