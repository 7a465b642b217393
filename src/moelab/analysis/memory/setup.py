"""The two setups a memory plan is of, each one frozen object handed over whole: how a model trains over its
data-parallel devices (`MemorySetup`) and the shape of a pipeline step (`PipelineShape`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import ConfigError, ModelConfig
from ...run_config import MULTI_STAGE_SCHEDULES, Schedule


@dataclass(frozen=True)
class MemorySetup:
    """A training step as far as memory goes: `micro_batch` sequences of `seq_len` tokens (None: the model's
    max_seq_len) per device, `devices` devices, experts split `expert_parallel` ways, ZeRO stage `zero` (what data
    parallelism shards: 1 optimizer state, 2 + gradients, 3 + weights), fp32 or bf16 mixed precision, with or
    without activation checkpointing."""

    micro_batch: int = 1
    seq_len: int | None = None
    devices: int = 1
    expert_parallel: int = 1
    zero: int = 0
    dtype: str = "fp32"
    activation_checkpointing: bool = False

    def tokens(self, cfg: ModelConfig) -> int:
        """Tokens of one micro-batch on one device."""
        return self.micro_batch * (self.seq_len or cfg.max_seq_len)

    def describe(self, name: str) -> str:
        """The one-line heading `moelab memory` prints above its table."""
        ckpt = ", activation checkpointing" if self.activation_checkpointing else ""
        return (
            f"{name}: micro-batch {self.micro_batch} x {self.seq_len} tokens, {self.devices} device(s), "
            f"expert-parallel {self.expert_parallel}, ZeRO {self.zero}, {self.dtype}{ckpt}"
        )


@dataclass(frozen=True)
class PipelineShape:
    """A pipeline step: `pipeline` ranks run `micro_batches` micro-batches of `micro_batch` x `seq_len` tokens under
    `schedule`, `virtual` stages per rank, the stages cut at `points` (parallel.pipeline_split: the first layer of
    each stage after the first) or evenly."""

    pipeline: int
    micro_batches: int
    micro_batch: int
    seq_len: int
    schedule: Schedule = "1f1b"
    virtual: int = 1
    points: tuple[int, ...] | None = None

    def check(self, cfg: ModelConfig) -> None:
        """ConfigError (naming the flag of `moelab memory`) for a shape the model or the schedule cannot take."""
        multi = self.schedule in MULTI_STAGE_SCHEDULES
        if (self.virtual > 1) != multi:
            raise ConfigError(f"--virtual-stages: expected {'2 or more' if multi else '1'}, got {self.virtual!r}")
        if self.pipeline * self.virtual > cfg.n_layers:
            stages = self.pipeline * self.virtual
            raise ConfigError(f"--pipeline: expected at most model.n_layers stages, got {stages!r}")

    def bubble(self) -> float:
        """The idle share of a step: (P - 1) / (M + P - 1), or (P - 1) / (V M + P - 1) interleaved."""
        work = self.micro_batches * (self.virtual if self.schedule in MULTI_STAGE_SCHEDULES else 1)
        return (self.pipeline - 1) / (work + self.pipeline - 1)

    def in_flight(self, rank: int) -> float:
        """Micro-batches whose activations rank `rank` holds at its peak (in units of its whole share of layers)."""
        P, M, V = self.pipeline, self.micro_batches, self.virtual
        if self.schedule in ("gpipe", "looped_bfs"):
            return M
        if self.schedule in ("interleaved_1f1b", "interleaved_zb"):
            return min(V * M, 2 * (P - rank - 1) + (V - 1) * P + 1) / V
        return min(P - rank, M)
