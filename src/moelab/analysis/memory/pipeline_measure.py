"""A pipeline's memory and bubble measured in real processes, per rank: what `moelab
memory --pipeline P --measure` puts beside the plan of `analysis.memory.pipeline_plan`.

Each of P gloo processes builds its stages as `moelab train` does, runs real steps of the
schedule (fp32, the run's optimizer) and reads:
  params, grads, optimizer  the bytes of the tensors it holds after a step;
  activations               the peak, over the step, of the bytes autograd keeps saved
                            at once (each storage once, weights excluded) and of the last
                            stage's logits the schedule keeps for their backward - the
                            in-flight micro-batches of the schedule, not one micro-batch
                            times a count;
  bubble                    1 - (time in its stages' forward, loss and backward) / (step
                            time): what it spent waiting for its neighbours (and on sends).
"""

from __future__ import annotations

import resource
import time
import weakref
from dataclasses import replace

import torch
import torch.distributed as dist

from ...config import ModelConfig
from ...model import Transformer
from ...parallel.local import run_local
from ...parallel.pipeline import build_rank, build_schedule, step_schedule
from ...run_config import OptimConfig
from ...train.optim import build_optimizer
from .setup import PipelineShape


class _Live:
    """Bytes of saved activations alive now, and their peak: a storage counts once while any
    tensor saved on it is still held by the graph (the graph drops it after its backward)."""

    def __init__(self, weights: set[int]):
        self.weights = weights
        self.reset()

    def reset(self) -> None:
        """Start a new count (a new step)."""
        self.now, self.peak = 0, 0
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, holders]

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        if t.untyped_storage().data_ptr() in self.weights:
            return t
        return _Held(t, self._acquire(t), self)

    def hold(self, t: torch.Tensor) -> None:
        """Count `t` (not saved by autograd: a stage output the schedule keeps) until it is freed."""
        weakref.finalize(t, self.release, self._acquire(t))

    def _acquire(self, t: torch.Tensor) -> int:
        """One more holder of t's storage (counted in `now` if it is the first); its key."""
        st = t.untyped_storage()
        ref = self.refs.setdefault(st.data_ptr(), [st.nbytes(), 0])
        if ref[1] == 0:
            self.now += ref[0]
            self.peak = max(self.peak, self.now)
        ref[1] += 1
        return st.data_ptr()

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is None:  # counted before the last reset
            return
        ref[1] -= 1
        if ref[1] == 0:
            self.now -= ref[0]
            del self.refs[key]


class _Held:
    __slots__ = ("key", "live", "t")

    def __init__(self, t: torch.Tensor, key: int, live: _Live):
        self.t, self.key, self.live = t, key, live

    def __del__(self):
        self.live.release(self.key)


def _timed(obj, names: tuple[str, ...], busy: list[float]) -> None:
    """Add the seconds `obj`'s methods `names` run to busy[0] (compute: sends and waits are the schedule's)."""
    for name in names:
        fn = getattr(obj, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                busy[0] += time.perf_counter() - t0

        setattr(obj, name, wrapped)


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def _measure_rank(rank: int, cfg: ModelConfig, shape: PipelineShape, steps: int, optim: OptimConfig | None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        points = list(shape.points) if shape.points is not None else None
        rs = build_rank(Transformer(cfg), shape.pipeline, shape.virtual, rank, points)
        micro_batches, micro_batch, seq_len = shape.micro_batches, shape.micro_batch, shape.seq_len
        sched = build_schedule(rs, shape.schedule, micro_batches, (micro_batch, seq_len), torch.device("cpu"))
        busy = [0.0]
        for st in getattr(sched, "_stages", None) or [sched._stage]:
            _timed(st, ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"), busy)
        _timed(sched, ("_maybe_compute_loss",), busy)
        live = _Live({p.untyped_storage().data_ptr() for p in rs.parameters()})
        for st in rs.stages:  # the logits stay cached for their backward, as one process's loss keeps them
            if st.last:
                st.register_forward_hook(lambda _m, _i, out: live.hold(out) if torch.is_grad_enabled() else None)
        opt = build_optimizer(rs, replace(optim or OptimConfig(), lr=1e-4))
        g = torch.Generator().manual_seed(0)  # the same batch on every rank
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch * micro_batches, seq_len + 1), generator=g)
        first, last = any(s.first for s in rs.stages), any(s.last for s in rs.stages)
        kw = {"target": tokens[:, 1:]} if last else {}
        out: dict = {}
        for step in range(steps):
            live.reset()
            busy[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
                step_schedule(sched, *((tokens[:, :-1],) if first else ()), **kw)
            wall = time.perf_counter() - t0
            grads = _nbytes(p.grad for p in rs.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == steps - 1 or not out:
                out = {"activations": live.peak, "grads": grads, "step_s": wall, "busy_s": busy[0]}
        out.update(
            params=_nbytes(rs.parameters()),
            optimizer=_nbytes(t for st in opt.state.values() for t in st.values()),
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            bubble=max(0.0, 1.0 - out["busy_s"] / max(out["step_s"], 1e-9)),
        )
        return out
    finally:
        dist.destroy_process_group()


def measure_pipeline(
    cfg: ModelConfig, shape: PipelineShape, *, steps: int = 3, optim: OptimConfig | None = None
) -> list[dict]:
    """Per pipeline rank of `shape`, measured in `shape.pipeline` real gloo processes on this machine (the
    last of `steps` steps, after warm-up): bytes of params, grads, optimizer state and
    peak saved activations, peak RSS, step and busy seconds, and the bubble; `optim` as the run trains (AdamW
    when None)."""
    return run_local(shape.pipeline, _measure_rank, cfg, shape, steps, optim)
