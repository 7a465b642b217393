"""LR schedules, weight-decay groups, and the health monitor."""
import math

import pytest

from moelab import ModelConfig, Transformer
from moelab.run_config import OptimConfig
from moelab.train.health import HealthMonitor
from moelab.train.optim import lr_at, param_groups


def test_cosine_and_wsd_schedules():
    c = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 100, c) == pytest.approx(0.1) and lr_at(9, 100, c) == pytest.approx(1.0)
    assert lr_at(55, 100, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, c) == pytest.approx(0.1)
    w = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, w) == 1.0 and lr_at(79, 100, w) == 1.0
    assert lr_at(89, 100, w) == pytest.approx(0.5) and lr_at(99, 100, w) == pytest.approx(0.0)


def test_no_decay_on_norms_biases_embeddings():
    m = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, qkv_bias=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in nd and "norm.weight" in nd and "layers.0.attn.wq.bias" in nd
    assert {names[id(p)] for p in decay["params"]} >= {"lm_head.weight", "layers.0.ffn.w_up"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_expert_lr_multiplier_scales_the_experts_first_step(name, tmp_path, text_file):
    """AdamW's first update is lr x sign(grad) (up to eps): with expert_lr_mult=3 the
    experts move 3x as far, everything else as far as without it. Muon: its update's
    size is fixed by the lr, so the same ratio holds."""
    import torch

    from moelab.run_config import load_config
    from moelab.train.optim import build_optimizer

    from conftest import TINY_MOE

    def first_step(mult):
        cfg = load_config("tiny-moe", [*TINY_MOE, f"optim.name={name}", f"optim.expert_lr_mult={mult}",
                                       "optim.weight_decay=0"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, cfg.optim)
        for g in opt.param_groups:  # as the trainer sets it each step
            g["lr"] = 1e-3 * g.get("lr_mult", 1.0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model(tokens, tokens).loss.backward()
        opt.step()
        return {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}

    one, three = first_step(1.0), first_step(3.0)
    for n in one:
        want = 3.0 if ".experts." in n else 1.0
        assert three[n] == pytest.approx(want * one[n], rel=1e-3), n
    with pytest.raises(Exception, match="expert_lr_mult"):
        load_config("tiny-moe", ["optim.expert_lr_mult=0"]).validate()


def test_health_monitor():
    h = HealthMonitor(spike_factor=2.0, spike_window=20, collapse_max_violation=3.0, collapse_window=3)
    for i in range(15):
        assert h.check_loss(i, 3.0 + 0.01 * i) is None
    assert "loss spike at step 15" in h.check_loss(15, 7.0)
    assert h.spikes == 1
    assert h.check_router(1, [4.0, 0.1]) == [] and h.check_router(2, [4.0, 0.1]) == []
    assert "MoE layer 0" in h.check_router(3, [4.0, 0.1])[0]
    h2 = HealthMonitor(2.0, 20, 3.0, 3, state=h.state())
    assert h2.spikes == 1 and list(h2.losses) == list(h.losses)
