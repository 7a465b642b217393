"""The memory planner against real tensors, and against published parameter counts."""
from dataclasses import replace

import pytest

from moelab.analysis.memory.plan import dense_twin, measure_memory, plan_memory
from moelab.analysis.memory.setup import MemorySetup, PipelineShape
from moelab import Transformer
from moelab.run_config import load_config


@pytest.mark.parametrize("recipe", ["tiny-dense", "tiny-moe", "small-dense", "small-moe"])
def test_param_grad_optimizer_bytes_exact(recipe):
    cfg = load_config(recipe).model
    plan = plan_memory(cfg, MemorySetup(micro_batch=2, seq_len=64))
    real = measure_memory(cfg, MemorySetup(micro_batch=2, seq_len=64), steps=1, isolated=False)
    for key in ("params", "grads", "optimizer"):
        assert plan.bytes[key] == real[key], key


@pytest.mark.parametrize("muon_router,experts", [(False, "per_expert"), (True, "per_expert"), (False, "dion")])
def test_muon_plan_counts_one_moment_for_its_matrices(muon_router, experts):
    """Under optim.name=muon the plan equals the state the real optimizer keeps after a step: one fp32
    momentum for the matrices and expert stacks (and Dion's basis for the experts under muon_experts=dion),
    AdamW's two moments and step for embeddings, norms, head and (unless muon_router) the router - less than
    AdamW's by about one moment of the model."""
    from moelab.run_config import OptimConfig

    cfg = load_config("tiny-moe").model
    optim = OptimConfig(name="muon", muon_router=muon_router, muon_experts=experts)
    plan = plan_memory(cfg, MemorySetup(micro_batch=2, seq_len=32), optim=optim)
    real = measure_memory(cfg, MemorySetup(micro_batch=2, seq_len=32), steps=1, isolated=False, optim=optim)
    assert plan.bytes["optimizer"] == real["optimizer"]
    if experts == "dion":  # one basis (E, B, A/4) per expert stack (E, A, B) beyond Muon's momentum
        stacks = [p for n, p in Transformer(cfg).named_parameters() if ".experts." in n]
        bases = sum(4 * p.shape[0] * max(p.shape[1:]) * round(min(p.shape[1:]) / 4) for p in stacks)
        muon = OptimConfig(name="muon", muon_router=muon_router)
        assert real["optimizer"] - plan_memory(cfg, MemorySetup(micro_batch=2, seq_len=32), optim=muon).bytes[
            "optimizer"] == bases  # fmt: skip
        return
    adamw = plan_memory(cfg, MemorySetup(micro_batch=2, seq_len=32)).bytes["optimizer"]
    assert 0.3 * adamw < adamw - real["optimizer"] < 0.5 * adamw


@pytest.mark.parametrize("recipe", ["small-dense", "small-moe"])
def test_activation_prediction_within_20_percent(recipe):
    """Measured = bytes of distinct storages autograd saves in one forward + the logits."""
    cfg = load_config(recipe).model
    plan = plan_memory(cfg, MemorySetup(micro_batch=4, seq_len=256))
    real = measure_memory(cfg, MemorySetup(micro_batch=4, seq_len=256), steps=1, isolated=False)
    assert abs(plan.bytes["activations"] / real["activations"] - 1) < 0.20


def test_published_counts():
    mix = load_config("mixtral-8x7b").model.param_counts()
    assert abs(mix["total"] / 46.7e9 - 1) < 0.01 and abs(mix["active"] / 12.9e9 - 1) < 0.02
    olmoe = load_config("olmoe-1b-7b").model.param_counts()
    assert abs(olmoe["total"] / 6.9e9 - 1) < 0.02 and abs(olmoe["active"] / 1.3e9 - 1) < 0.03


def test_sharding_rules():
    cfg = load_config("mixtral-8x7b").model
    one = plan_memory(cfg, MemorySetup(seq_len=1024))
    ep = plan_memory(cfg, MemorySetup(seq_len=1024, devices=8, expert_parallel=8))
    z3 = plan_memory(cfg, MemorySetup(seq_len=1024, devices=8, expert_parallel=1, zero=3))
    assert ep.bytes["params"] < one.bytes["params"] / 3  # experts split 8 ways, attention replicated
    assert z3.bytes["params"] == pytest.approx(one.bytes["params"] / 8, rel=1e-6)
    assert ep.bytes["comm"] > 0 and one.bytes["comm"] == 0
    ckpt = plan_memory(cfg, MemorySetup(seq_len=1024, activation_checkpointing=True))
    assert ckpt.bytes["activations"] < one.bytes["activations"] / 4
    bf16 = plan_memory(cfg, MemorySetup(seq_len=1024, dtype="bf16"))
    assert bf16.bytes["params"] * 2 == one.bytes["params"]
    twin = dense_twin(cfg)
    assert twin.moe is None and twin.d_ff == 2 * 14336
    assert plan_memory(twin).notes == [] and len(one.notes) >= 4
    with pytest.raises(ValueError, match="must divide n_experts"):
        plan_memory(cfg, MemorySetup(devices=3, expert_parallel=3))


def test_zero_and_bf16_bytes_against_real_tensors():
    """ZeRO-1/2/3 over 4 data-parallel devices shard the optimizer, then the gradients,
    then the parameters 4 ways; bf16 keeps bf16 weights and grads plus fp32 AdamW moments
    and an fp32 master copy. Each expected value is read off real tensors here."""
    import torch

    from moelab.model import Transformer
    cfg = load_config("tiny-moe").model
    real = measure_memory(cfg, MemorySetup(micro_batch=1, seq_len=16), steps=1, isolated=False)
    # AdamW keeps one fp32 step counter per parameter tensor; every rank keeps its own
    steps = 4 * len(list(Transformer(cfg).parameters()))
    for zero, sharded in ((1, {"optimizer"}), (2, {"optimizer", "grads"}), (3, {"optimizer", "grads", "params"})):
        plan = plan_memory(cfg, MemorySetup(micro_batch=1, seq_len=16, devices=4, zero=zero))
        for key in ("params", "grads", "optimizer"):
            want = real[key] / 4 if key in sharded else real[key]
            if key == "optimizer":
                want = (real[key] - steps) / 4 + steps
            assert plan.bytes[key] == pytest.approx(want, rel=1e-9), (zero, key)
    bf16_model = Transformer(cfg).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in bf16_model.parameters())
    plan = plan_memory(cfg, MemorySetup(micro_batch=1, seq_len=16, dtype="bf16"))
    assert plan.bytes["params"] == bf16_bytes == plan.bytes["grads"]
    assert plan.bytes["optimizer"] == real["optimizer"] + real["params"]  # fp32 moments + fp32 master weights


def test_memory_cli_json_and_measure():
    import json

    from conftest import run_cli
    from moelab.model import Transformer
    _, out, _ = run_cli("memory", "tiny-moe", "--json", "--measure", "--micro-batch", "2", "--seq-len", "32")
    plans = json.loads(out)
    assert [p["name"] for p in plans] == ["tiny-moe", "tiny-moe dense twin"]
    model = Transformer(load_config("tiny-moe").model)
    assert plans[0]["params_total"] == sum(p.numel() for p in model.parameters())
    for p in plans:
        assert {"params", "grads", "optimizer", "activations", "total"} <= set(p["bytes"])
        m = p["measured"]
        assert m["params"] == p["bytes"]["params"] and m["optimizer"] == p["bytes"]["optimizer"]
        assert abs(p["bytes"]["activations"] / m["activations"] - 1) < 0.25
    assert plans[0]["bytes"]["params"] > 2 * plans[1]["bytes"]["params"]  # 8 experts vs one dense FFN


@pytest.mark.parametrize("layout,optim", [(["--expert-parallel", "2", "--zero", "3"], "adamw"),
                                          (["--zero", "0"], "adamw"),
                                          (["--expert-parallel", "2", "--zero", "3"], "muon")])
def test_plan_per_rank_equals_a_real_two_process_run(layout, optim, tmp_path):
    """`--devices 2 --measure` launches 2 gloo processes that shard the model as a
    distributed run does (FSDP2; experts split over the expert-parallel group) and read
    rank 0's tensors: params, grads and optimizer (AdamW's, or Muon's sharded momentum)
    equal the plan, activations within 20%."""
    import json

    from moelab.run_config import save_config

    from conftest import run_cli
    recipe = tmp_path / "tiny-moe.yaml"
    cfg = load_config("tiny-moe")
    cfg.optim.name = optim
    save_config(cfg, recipe)
    _, out, _ = run_cli("memory", str(recipe), "--json", "--measure", "--devices", "2", *layout,
                        "--micro-batch", "2", "--seq-len", "32")
    for p in json.loads(out):
        m = p["measured"]
        for key in ("params", "grads", "optimizer"):
            assert m[key] == p["bytes"][key], (p["name"], key)
        assert abs(p["bytes"]["activations"] / m["activations"] - 1) < 0.20, p["name"]
    moe, twin = json.loads(out)
    one = plan_memory(load_config("tiny-moe").model, MemorySetup(micro_batch=2, seq_len=32))
    if "3" in layout:  # sharded: half of one device's weights (every tensor here splits evenly)
        assert moe["bytes"]["params"] * 2 == one.bytes["params"]


def test_pipeline_plan_per_rank_equals_real_pipeline_ranks(tmp_path):
    """`moelab memory --pipeline 2 --measure`: 2 real processes run the schedule; each
    rank's weights, gradients and optimizer state (AdamW's under 1F1B, Muon's under GPipe)
    equal the plan's bytes, and the activations it keeps saved at once (the micro-batches
    in flight, measured at their peak) are within 20% of the plan - under 1F1B the first
    rank holds two micro-batches, under GPipe all four."""
    import json

    from moelab.analysis.memory.pipeline_measure import measure_pipeline
    from moelab.analysis.memory.pipeline_plan import plan_stages
    from moelab.run_config import OptimConfig, save_config

    from conftest import TINY_MOE, run_cli

    recipe = tmp_path / "four-layers.yaml"
    cfg = load_config("tiny-moe", [*TINY_MOE, "model.n_layers=4"])
    save_config(cfg, recipe)
    out = run_cli("memory", str(recipe), "--pipeline", "2", "--micro-batches", "4", "--micro-batch", "2",
                  "--seq-len", "32", "--measure", "--json")[1]
    pp = json.loads(out)[0]["pipeline"]
    runs = {"1f1b": (pp["ranks"], pp["measured"])}
    muon = OptimConfig(name="muon")  # and with Muon's one moment for the matrices it takes
    gpipe = PipelineShape(pipeline=2, micro_batches=4, micro_batch=2, seq_len=32, schedule="gpipe")
    runs["gpipe"] = (plan_stages(cfg.model, gpipe, optim=muon), measure_pipeline(cfg.model, gpipe, steps=2, optim=muon))
    for schedule, (plan, measured) in runs.items():
        for r, (want, got) in enumerate(zip(plan, measured, strict=True)):
            for key in ("params", "grads", "optimizer"):
                assert want["bytes"][key] == got[key], (schedule, r, key)
            assert want["bytes"]["activations"] == pytest.approx(got["activations"], rel=0.2), (schedule, r)
            assert 0 < got["bubble"] < 1, (schedule, r)  # every rank waits for a neighbour at some point
    assert [s["micro_batches_in_flight"] for s in runs["1f1b"][0]] == [2, 1]  # 1F1B: the first rank holds the most
    one = runs["1f1b"][1][0]["activations"]
    assert runs["gpipe"][1][0]["activations"] > 1.5 * one  # GPipe keeps every micro-batch's activations
    shape = PipelineShape(pipeline=2, micro_batches=4, micro_batch=1, seq_len=1)
    assert shape.bubble() == pytest.approx(1 / 5)
    assert replace(shape, schedule="interleaved_1f1b", virtual=2).bubble() == pytest.approx(1 / 9)
    # the plan is of pipeline ranks alone: asked to divide them further, it says so instead of ignoring it
    rc, _, err = run_cli("memory", str(recipe), "--pipeline", "2", "--devices", "2", check=False)
    assert rc == 2 and "--devices/--zero: expected 1 and 0 with --pipeline" in err