"""moelab's trainer and a plain transformers loop, from the same exported initial
weights on the same batches, produce the same losses step by step (fp32, CPU)."""
import sys
from pathlib import Path

import pytest

from conftest import TINY, TINY_MOE
from moelab.run_config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from hf_parity import training_parity  # noqa: E402  (a verification harness, not part of the package)


@pytest.mark.parametrize("recipe,overrides,arch", [
    ("tiny-moe", TINY_MOE + ["model.moe.jitter=0", "model.moe.z_coef=0.001", "model.moe.lb_coef=0.01"], "mixtral"),
    ("tiny-dense", TINY, "llama"),
])
def test_training_losses_match_transformers(recipe, overrides, arch, text_file):
    cfg = load_config(recipe, overrides + ["train.grad_accum=2", "optim.warmup_steps=2", "optim.name=adamw"])
    cfg.data.source = str(text_file)
    r = training_parity(cfg, steps=8)
    assert r["arch"] == arch and len(r["moelab"]) == len(r["transformers"]) == 8
    assert r["moelab"][-1] < r["moelab"][0] - 0.3  # it really trained
    for ours, theirs in zip(r["moelab"], r["transformers"]):
        assert abs(ours - theirs) < 2e-5, (r["moelab"], r["transformers"])


def test_parity_refuses_an_optimizer_the_reference_does_not_run():
    """The reference loop is torch's AdamW: a Muon config would compare two different optimizers."""
    cfg = load_config("tiny-dense", TINY + ["optim.name=muon"])
    with pytest.raises(ValueError, match="optim.name=adamw"):
        training_parity(cfg, steps=2)
