"""Parallelism applied from outside the single-device model code: the layout and its
meshes (mesh.py), expert parallelism behind the experts seam (expert_parallel.py), FSDP2
and the gradient arithmetic (parallelize.py), layout-free training state and DCP
checkpoints (state.py, checkpoint.py), and a local multi-process launcher (local.py)."""

from .expert_parallel import ExpertParallelExperts, shard_experts

__all__ = ["ExpertParallelExperts", "shard_experts"]
