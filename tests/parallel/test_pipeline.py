"""Pipeline parallelism on torch.distributed.pipelining (2 real processes, gloo). One step
of 1F1B and of interleaved 1F1B over 4 micro-batches gives every parameter the gradient
one process gives over the same micro-batches - including the routers of the first
stage, whose balance and z losses never meet the last stage's loss function (with a
large balance coefficient, so a dropped aux loss could not hide). `moelab train` with
parallel.pipeline=2 (1F1B, interleaved, GPipe with global balancing and bias balancing)
logs the losses one process logs with train.grad_accum micro-batches and ends on the
same weights; its checkpoints resume in one process and the other way round."""
import json
import sys
from pathlib import Path

import pytest
import torch

from moelab import ConfigError, Transformer
from moelab.analysis.memory.pipeline_plan import plan_stages
from moelab.analysis.memory.setup import PipelineShape
from moelab.parallel.pipeline import build_rank, split_layers, stages_of
from moelab.run_config import load_config
from moelab.store.checkpoint import check_checkpoint, latest_checkpoint, model_tensors
from moelab.train import train

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


def pipeline_rank(rank, schedule, virtual):
    import torch.distributed as dist

    from moelab.parallel.pipeline import build_rank, build_schedule, pipeline_forward_backward

    dist.init_process_group("gloo")
    cfg = config()
    x, y = batch(cfg)
    rs = build_rank(model(cfg), 2, virtual, rank)  # stage i on rank i mod 2 (looped placement)
    sched = build_schedule(rs, schedule, M, (x.shape[0] // M, x.shape[1]), torch.device("cpu"))
    _, lm, _ = pipeline_forward_backward(rs, sched, x, y, M)
    grads = {n: p.grad.numpy().copy() for n, p in rs.named_parameters() if p.grad is not None}
    dist.destroy_process_group()
    return grads, lm


SCHEDULES = {"1f1b": 1, "gpipe": 1, "interleaved_1f1b": 2, "looped_bfs": 2, "interleaved_zb": 2}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pipeline_gradients_equal_one_process(schedule):
    cfg = config()
    ref = one_process(cfg)
    results = spawn(2, pipeline_rank, schedule, SCHEDULES[schedule])
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
    assert results[0][1] == results[1][1] == pytest.approx(sum(want) / M, abs=1e-6)  # the same on every rank
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
    # parallel.pipeline_split: the last stage also holds the head, so a recipe may give it fewer layers
    first = build_rank(model(config()), 2, 1, 0, [3])
    assert sorted(first.layers.keys()) == ["0", "1", "2"] and first.embed is not None and first.lm_head is None
    plan = plan_stages(config(), PipelineShape(pipeline=2, micro_batches=4, micro_batch=2, seq_len=32, points=(3,)))
    assert [r["layers"] for r in plan] == [[0, 1, 2], [3]]


TRAIN = [*TINY_MOE, "model.n_layers=4", "train.grad_accum=4", "train.log_every=1", "train.eval_every=2",
         "model.moe.jitter=0", "optim.eps=1e-6", "model.moe.lb_coef=0.5", "model.moe.z_coef=0.01"]


def train_run(rank, out, corpus, overrides, steps, kwargs):
    cfg = load_config("tiny-moe", [*TRAIN, *overrides])
    cfg.data.source, cfg.train.steps = str(corpus), steps
    train(cfg, out, quiet=True, **kwargs)


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_runs(a_dir, b_dir, steps=None):
    a = {r["step"]: r for r in records(a_dir)}
    b = {r["step"]: r for r in records(b_dir)}
    for s in steps or sorted(a):
        for key in ("loss", "lm_loss", "lb_loss", "z_loss", "grad_norm", "val_loss"):
            assert (b[s].get(key) is None) == (a[s].get(key) is None), (s, key)
            if a[s].get(key) is not None:
                assert b[s][key] == pytest.approx(a[s][key], abs=1e-5), (s, key)
        for la, lb in zip(a[s]["moe_layers"], b[s]["moe_layers"], strict=True):
            assert lb["load"] == pytest.approx(la["load"], abs=1e-6)
    wa = model_tensors(latest_checkpoint(Path(a_dir) / "checkpoints"))
    wb = model_tensors(latest_checkpoint(Path(b_dir) / "checkpoints"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)


PIPELINES = {
    "1f1b": ([], []),
    "interleaved 1f1b": (["parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2"], []),
    "gpipe, global and bias balancing": (
        ["parallel.pipeline_schedule=gpipe"], ["model.moe.balance_scope=global", "model.moe.bias_update_rate=0.01"]
    ),
}


def test_pipeline_with_expert_parallelism_equals_one_process(tmp_path, text_file):
    """PP=2 x EP=2 on 4 processes: each stage's 2 data ranks split every micro-batch and
    exchange tokens between their experts; global balancing counts over both. The dense
    weights FSDP2-sharded over the 2 (then replicated, for the resharding half)."""
    common = ["model.moe.balance_scope=global", "model.moe.bias_update_rate=0.01"]
    train_run(0, tmp_path / "one", text_file, common, 4, {})
    layout = ["parallel.pipeline=2", "parallel.expert=2", *common]
    spawn(4, train_run, tmp_path / "four", text_file, [*layout, "parallel.data_shard=2"], 4, {})
    assert_same_runs(tmp_path / "one", tmp_path / "four")
    saved = check_checkpoint(latest_checkpoint(tmp_path / "four" / "checkpoints"))["layout"]
    assert (saved["pipeline"], saved["expert"], saved["world"]) == (2, 2, 4)
    # stopped at step 2 on 4 processes, resumed in one: the same steps 3 and 4
    spawn(4, train_run, tmp_path / "re", text_file, layout, 4, {"stop_after": 2})
    train_run(0, tmp_path / "re", text_file, common, 4, {"resume": True})
    assert_same_runs(tmp_path / "one", tmp_path / "re", steps=[3, 4])


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_training_equals_one_process(tmp_path, text_file, name):
    layout, common = PIPELINES[name]
    train_run(0, tmp_path / "one", text_file, common, 4, {})
    spawn(2, train_run, tmp_path / "two", text_file, ["parallel.pipeline=2", *layout, *common], 4, {})
    assert len(records(tmp_path / "two")) == 4  # written once, by rank 0
    assert_same_runs(tmp_path / "one", tmp_path / "two")


def finetune_run(rank, base, sft, out, overrides):
    from moelab.finetune.run import finetune

    finetune(str(base), str(sft), out, "full", steps=3, overrides=overrides, quiet=True)


def test_padded_fine_tuning_under_a_pipeline_equals_one_process(tmp_path, text_file):
    """SFT rows of different lengths are padded: the padding mask reaches every stage's MoE layers
    (padding is neither routed nor counted in the balance) and the held-out evaluation, so the
    losses, expert loads, token counts and weights are one process's."""
    train_run(0, tmp_path / "base", text_file, [], 2, {})
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"repeat {'x ' * (i % 7)}{i}:", "completion": f" {i} " * (1 + i % 3)})
                           + "\n" for i in range(60)))
    common = ["train.eval_every=2", "train.ckpt_every=3"]
    finetune_run(0, tmp_path / "base", sft, tmp_path / "one", common)
    spawn(2, finetune_run, tmp_path / "base", sft, tmp_path / "two", ["parallel.pipeline=2", *common])
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert all(r["tokens"] % (4 * 4 * 32) for r in one)  # padding was there, and not counted
    assert_same_runs(tmp_path / "one", tmp_path / "two")


def poison_third_step(model):
    """prepare_model: the embedding's gradient is NaN in the third step's first backward
    (4 micro-batches a step) - on one pipeline rank only, the one that holds the embedding."""
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        return g * float("nan") if calls["n"] == 9 else g

    model.embed.weight.register_hook(hook)


def test_a_nan_on_one_stage_is_skipped_by_every_rank(tmp_path, text_file):
    """The gradient norm sums every rank's squares, so a NaN on the first stage alone makes
    both ranks skip the same step, as one process does; the runs then go on alike."""
    skip = ["train.on_nonfinite=skip"]
    train_run(0, tmp_path / "one", text_file, skip, 5, {"prepare_model": poison_third_step})
    spawn(2, train_run, tmp_path / "two", text_file, ["parallel.pipeline=2", *skip], 5,
          {"prepare_model": poison_third_step})
    for run in ("one", "two"):
        recs = records(tmp_path / run)
        assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1], run
        assert recs[2]["grad_norm"] == "nan", run
    assert_same_runs(tmp_path / "one", tmp_path / "two", steps=[1, 2, 4, 5])


def test_pipeline_checkpoints_resume_in_one_process_and_back(tmp_path, text_file):
    train_run(0, tmp_path / "ref", text_file, [], 4, {})
    # two pipeline ranks stop at step 2; one process resumes to 4
    spawn(2, train_run, tmp_path / "a", text_file, ["parallel.pipeline=2"], 4, {"stop_after": 2})
    assert (latest_checkpoint(tmp_path / "a" / "checkpoints") / "dcp" / ".metadata").is_file()
    train_run(0, tmp_path / "a", text_file, [], 4, {"resume": True})
    assert_same_runs(tmp_path / "ref", tmp_path / "a", steps=[3, 4])
    # one process stops at step 2; two pipeline ranks resume to 4
    train_run(0, tmp_path / "b", text_file, [], 4, {"stop_after": 2})
    spawn(2, train_run, tmp_path / "b", text_file, ["parallel.pipeline=2"], 4, {"resume": True})
    assert_same_runs(tmp_path / "ref", tmp_path / "b", steps=[3, 4])


def test_bad_pipeline_layouts_are_named():
    from moelab.parallel.mesh import plan_layout

    cases = [
        (["parallel.pipeline=2"], 2, "train.grad_accum=1 micro-batches cannot fill a pipeline of 2 stages"),
        (["parallel.pipeline=2", "train.grad_accum=2", "model.n_layers=1"], 2, "exceed model.n_layers=1"),
        (["parallel.pipeline=2", "train.grad_accum=2", "parallel.expert=2"], 2,
         r"parallel.expert=2 does not divide the 1 data-parallel processes \(world size 2 / parallel.pipeline=2\)"),
        (["parallel.pipeline=2", "train.grad_accum=2"], 3, "parallel.pipeline=2 does not divide the world size 3"),
        (["parallel.pipeline=2", "train.grad_accum=2", "parallel.data_shard=3"], 4,
         "data_shard=3 does not divide the 2 data-parallel processes"),
        (["parallel.pipeline=2", "train.grad_accum=2", "train.batch_size=3"], 4,
         "batch_size=3 .* does not split evenly over 2 data-parallel ranks"),
        (["parallel.pipeline=2", "train.grad_accum=2", "model.tie_embeddings=true"], 2, "tie_embeddings=false"),
        (["parallel.pipeline=2", "train.grad_accum=2", "parallel.virtual_stages=2"], 2, "interleaved_1f1b, .* need"),
        (["parallel.pipeline=2", "train.grad_accum=2", "parallel.pipeline_split=[4]"], 2,
         r"parallel.pipeline_split: cannot split 2 layers at \[4\]"),
        (["parallel.pipeline=2", "train.grad_accum=2", "parallel.pipeline_split=2"], 2,
         "parallel.pipeline_split: expected a list of integers or null, got 2"),
        (["parallel.pipeline=2", "train.grad_accum=3", "parallel.pipeline_schedule=interleaved_zb",
          "parallel.virtual_stages=2", "model.n_layers=4"], 2, "interleaved_zb needs train.grad_accum .* divisible by"),
    ]
    for overrides, world, message in cases:
        with pytest.raises(ConfigError, match=message):  # when the config loads, or when the layout is planned
            plan_layout(load_config("tiny-moe", [*TINY_MOE, *overrides]), world, 0)
