"""The memory planner against real tensors, and against published parameter counts."""
import pytest

from moelab.analysis.memory import dense_twin, measure_memory, plan_memory
from moelab.run_config import load_config


@pytest.mark.parametrize("recipe", ["tiny-dense", "tiny-moe", "small-dense", "small-moe"])
def test_param_grad_optimizer_bytes_exact(recipe):
    cfg = load_config(recipe).model
    plan = plan_memory(cfg, micro_batch=2, seq_len=64)
    real = measure_memory(cfg, micro_batch=2, seq_len=64, steps=1, isolated=False)
    for key in ("params", "grads", "optimizer"):
        assert plan.bytes[key] == real[key], key


@pytest.mark.parametrize("recipe", ["small-dense", "small-moe"])
def test_activation_prediction_within_20_percent(recipe):
    """Measured = bytes of distinct storages autograd saves in one forward + the logits."""
    cfg = load_config(recipe).model
    plan = plan_memory(cfg, micro_batch=4, seq_len=256)
    real = measure_memory(cfg, micro_batch=4, seq_len=256, steps=1, isolated=False)
    assert abs(plan.bytes["activations"] / real["activations"] - 1) < 0.20


def test_published_counts():
    mix = load_config("mixtral-8x7b").model.param_counts()
    assert abs(mix["total"] / 46.7e9 - 1) < 0.01 and abs(mix["active"] / 12.9e9 - 1) < 0.02
    olmoe = load_config("olmoe-1b-7b").model.param_counts()
    assert abs(olmoe["total"] / 6.9e9 - 1) < 0.02 and abs(olmoe["active"] / 1.3e9 - 1) < 0.03


def test_sharding_rules():
    cfg = load_config("mixtral-8x7b").model
    one = plan_memory(cfg, seq_len=1024)
    ep = plan_memory(cfg, seq_len=1024, devices=8, expert_parallel=8)
    z3 = plan_memory(cfg, seq_len=1024, devices=8, expert_parallel=1, zero=3)
    assert ep.bytes["params"] < one.bytes["params"] / 3  # experts split 8 ways, attention replicated
    assert z3.bytes["params"] == pytest.approx(one.bytes["params"] / 8, rel=1e-6)
    assert ep.bytes["comm"] > 0 and one.bytes["comm"] == 0
    ckpt = plan_memory(cfg, seq_len=1024, activation_checkpointing=True)
    assert ckpt.bytes["activations"] < one.bytes["activations"] / 4
    bf16 = plan_memory(cfg, seq_len=1024, dtype="bf16")
    assert bf16.bytes["params"] * 2 == one.bytes["params"]
    twin = dense_twin(cfg)
    assert twin.moe is None and twin.d_ff == 2 * 14336
    assert plan_memory(twin).notes == [] and len(one.notes) >= 4
    with pytest.raises(ValueError, match="must divide n_experts"):
        plan_memory(cfg, devices=3, expert_parallel=3)
