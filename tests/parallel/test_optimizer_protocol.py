"""A new optimizer is one registration: implementing the state protocol (`ensure_state`, and `state_bytes` for
the plans) it gets the right memory plan, and its checkpoints resume under FSDP2 exactly, with nothing in
`moelab.parallel` taught about it."""
import json
import sys
from pathlib import Path

import pytest
import torch

from moelab.analysis.memory.plan import measure_memory, plan_memory
from moelab.analysis.memory.setup import MemorySetup
from moelab.run_config import OptimConfig, load_config
from moelab.train import train
from moelab.train.optim import OptimizerKind, register_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_MOE  # noqa: E402
from launch import spawn  # noqa: E402


class SGDMomentum(torch.optim.SGD):
    """torch's SGD with momentum, plus the one method moelab asks of an optimizer."""

    def ensure_state(self):
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:  # SGD's first step would clone the gradient: zeros * momentum + grad, the same
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)


# at import: the spawned ranks import this module too, so they know the name as well
register_optimizer("sgdm", OptimizerKind(
    build=lambda groups, cfg: SGDMomentum(groups, lr=cfg.peak_lr, momentum=0.9),
    state_bytes=lambda name, p, cfg: (4, 0),  # one fp32 momentum per element
))  # fmt: skip
OVERRIDES = [*TINY_MOE, "optim.name=sgdm", "optim.lr=0.05", "train.log_every=1", "train.eval_every=100",
             "train.ckpt_every=2", "model.moe.jitter=0"]  # fmt: skip


def test_its_memory_plan_is_the_state_it_keeps():
    cfg = load_config("tiny-moe", TINY_MOE).model
    optim = OptimConfig(name="sgdm")
    plan = plan_memory(cfg, MemorySetup(micro_batch=2, seq_len=32), optim=optim)
    real = measure_memory(cfg, MemorySetup(micro_batch=2, seq_len=32), steps=1, isolated=False, optim=optim)
    assert plan.bytes["optimizer"] == real["optimizer"] == 4 * cfg.param_counts()["total"]


def run(rank, out, corpus, steps, kwargs, layout):
    cfg = load_config("tiny-moe", [*OVERRIDES, *layout])
    cfg.data.source, cfg.train.steps = str(corpus), steps
    train(cfg, out, quiet=True, **kwargs)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_it_resumes_under_fsdp2_like_one_uninterrupted_process(tmp_path, text_file):
    run(0, tmp_path / "ref", text_file, 4, {}, [])
    shard = ["parallel.data_shard=2"]
    spawn(2, run, tmp_path / "run", text_file, 4, {"stop_after": 2}, shard)
    spawn(2, run, tmp_path / "run", text_file, 4, {"resume": True}, shard)  # the momentum comes back from DCP
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), abs=1e-5)
