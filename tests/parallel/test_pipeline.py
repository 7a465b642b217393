"""Pipeline stages on torch.distributed.pipelining (2 real processes, gloo): one step of
1F1B and of interleaved 1F1B over 4 micro-batches gives every parameter the gradient one
process gives over the same micro-batches - including the routers of the first stage,
whose balance and z losses never meet the last stage's loss function (with a large
balance coefficient, so a dropped aux loss could not hide)."""
import sys
from pathlib import Path

import pytest
import torch

from moelab import ConfigError, Transformer
from moelab.parallel.pipeline import split_layers, stages_of
from moelab.run_config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_MOE  # noqa: E402
from launch import spawn  # noqa: E402

M = 4  # micro-batches


def config(lb_coef=10.0):
    return load_config("tiny-moe", [*TINY_MOE, "model.n_layers=4", f"model.moe.lb_coef={lb_coef}",
                                    "model.moe.z_coef=0.1", "model.moe.jitter=0"]).model


def batch(cfg):
    x = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    return x, torch.roll(x, -1, 1)


def model(cfg):
    torch.manual_seed(0)
    return Transformer(cfg)


def one_process(cfg):
    """Gradients of the mean over micro-batches of (LM loss + mean aux loss), as `moelab train` takes them."""
    m = model(cfg)
    x, y = batch(cfg)
    for xm, ym in zip(x.chunk(M), y.chunk(M), strict=True):
        (m(xm, ym).loss / M).backward()
    return {n: p.grad for n, p in m.named_parameters()}


def pipeline_rank(rank, schedule):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    from moelab.parallel.pipeline import lm_loss

    dist.init_process_group("gloo")
    cfg = config()
    x, y = batch(cfg)
    virtual = 2 if schedule == "interleaved" else 1
    stages = stages_of(model(cfg), 2 * virtual)
    mine = [s for i, s in enumerate(stages) if i % 2 == rank]  # stage i on rank i mod 2 (looped placement)
    pipe = [PipelineStage(s, i, len(stages), torch.device("cpu")) for i, s in enumerate(stages) if i % 2 == rank]
    sched = (ScheduleInterleaved1F1B(pipe, M, loss_fn=lm_loss) if virtual > 1
             else Schedule1F1B(pipe[0], M, loss_fn=lm_loss))
    losses = []
    if rank == 0:
        sched.step(x)
    else:
        sched.step(target=y, losses=losses)
    grads = {n: p.grad.numpy().copy() for s in mine for n, p in s.named_parameters() if p.grad is not None}
    dist.destroy_process_group()
    return grads, [float(v) for v in losses]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_pipeline_gradients_equal_one_process(schedule):
    cfg = config()
    ref = one_process(cfg)
    results = spawn(2, pipeline_rank, schedule)
    seen = {}
    for grads, _ in results:
        seen |= grads
    assert seen.keys() == ref.keys()  # every parameter lives on exactly one rank, under its own name
    for n, g in seen.items():
        torch.testing.assert_close(torch.from_numpy(g), ref[n], atol=1e-6, rtol=1e-5, msg=n)
    x, y = batch(cfg)
    with torch.no_grad():
        m = model(cfg)
        want = [float(m(xm, ym).lm_loss) for xm, ym in zip(x.chunk(M), y.chunk(M), strict=True)]
    assert results[1][1] == pytest.approx(want, abs=1e-6)  # the last stage's per-micro-batch LM losses
    # the first stage's routers: their balance loss is most of their gradient here, so a
    # pipeline that dropped it would be far off
    lm_only = one_process(config(lb_coef=0.0))
    router = "layers.0.ffn.router.weight"
    assert float((ref[router] - lm_only[router]).norm()) > 0.5 * float(ref[router].norm())


def test_stage_split():
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in split_layers(4, 2, [1])] == [[0], [1, 2, 3]]
    with pytest.raises(ConfigError, match="non-empty stages"):
        split_layers(2, 3)
    with pytest.raises(ConfigError, match="non-empty stages"):
        split_layers(4, 2, [0])
    tied = load_config("tiny-moe", [*TINY_MOE, "model.tie_embeddings=true"]).model
    with pytest.raises(ConfigError, match="tie_embeddings=false"):
        stages_of(model(tied), 2)
    names = [n for s in stages_of(model(config()), 2) for n in s.state_dict()]
    assert sorted(names) == sorted(model(config()).state_dict())  # the whole model's names, each once
