"""Parallelism applied from outside the single-device model code (expert parallelism first)."""

from .expert_parallel import ExpertParallelExperts, shard_experts

__all__ = ["ExpertParallelExperts", "shard_experts"]
