"""Metrics: one JSON object per logged step in RUN/metrics.jsonl, mirrored to TensorBoard.

Per MoE layer (list `moe_layers`, in layer order): `load` (fraction of assignments per
expert over the logging window), `max_violation`, `dropped_fraction`, `router_entropy`,
`lb_loss`, `z_loss` (window means) and `dead_experts` (experts that got no token in the
window).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from ..moe import MoEStats


class MoEWindow:
    """Accumulates per-layer router statistics between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new logging window."""
        self.loads: list[torch.Tensor] = []
        self.sums: list[dict[str, float]] = []
        self.n = 0

    def add(self, stats: list[MoEStats]) -> None:
        """Add one forward pass's per-layer MoE statistics to the window."""
        if not self.loads:
            self.loads = [torch.zeros_like(s.tokens_per_expert, dtype=torch.float64) for s in stats]
            self.sums = [dict.fromkeys(("lb_loss", "z_loss", "dropped_fraction", "router_entropy"), 0.0) for _ in stats]
        for i, s in enumerate(stats):
            self.loads[i] += s.tokens_per_expert.detach().double()
            acc = self.sums[i]
            acc["lb_loss"] += s.lb_loss.item()
            acc["z_loss"] += s.z_loss.item()
            acc["dropped_fraction"] += float(s.dropped_fraction)
            acc["router_entropy"] += float(s.router_entropy)
        self.n += 1

    def summary(self) -> list[dict]:
        """Per MoE layer, over the window: load fractions per expert, max-violation, dead experts, and the mean lb/z
        loss, dropped fraction and router entropy."""
        out = []
        for load, acc in zip(self.loads, self.sums, strict=True):
            total = float(load.sum())
            frac = (load / total) if total > 0 else load
            mean = float(load.mean())
            out.append(
                {
                    "load": [round(float(f), 5) for f in frac],
                    "max_violation": float(load.max()) / mean - 1.0 if mean > 0 else 0.0,
                    "dead_experts": int((load == 0).sum()),
                    **{k: v / max(self.n, 1) for k, v in acc.items()},
                }
            )
        return out


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by tensors. CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc), else its peak (ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class TrainingMemory:
    """Memory taken by the training state and step, not by data preparation: created just
    before the model is built; `sample()` is called after every optimizer step.

    CUDA: the allocator's peak since creation (max_memory_allocated), exact. CPU: growth of
    resident memory over its value at creation, taken after the first optimizer step,
    which allocates everything a step needs (weights, gradients, optimizer state, one step's
    activation peak - moelab's allocator tuning keeps freed blocks resident, so the peak
    is still counted). Later growth of resident memory is heap fragmentation and
    evaluation or checkpoint buffers; it varies by tens of MiB from run to run and would
    hide the model's own difference, so it is not counted.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = resident_bytes()
        self.peak = 0

    def sample(self) -> int:
        """The training memory in bytes (see the class docstring)."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.base)
        elif not self.peak:
            self.peak = max(1, resident_bytes() - self.base)
        return self.peak


class MetricsWriter:
    """Appends metric records to RUN/metrics.jsonl (one JSON object per line, flushed) and mirrors scalars to
    TensorBoard when available."""

    @staticmethod
    def preload() -> None:
        """Import TensorBoard's writer now: its libraries take ~100 MiB that would otherwise
        land inside the training-memory measurement, which starts before the model is built."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            pass

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.f = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, record: dict) -> None:
        """Append one record and mirror its scalars (and per-layer MoE scalars) to TensorBoard."""
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
            for i, layer in enumerate(record.get("moe_layers", [])):
                for k, v in layer.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"moe/layer{i}/{k}", v, step)

    def close(self) -> None:
        """Close the log file and the TensorBoard writer."""
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log has each step once. A line
    torn by a kill mid-write (not JSON) is dropped too: it cannot be read, and what it
    held is rewritten by the resumed steps."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
