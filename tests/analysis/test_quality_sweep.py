"""benchmarks/quality_sweep.py's variants keep the promise its verdicts rest on: every MoE
variant touches as many parameters per token as its dense twin (to within the routers'
E x D weights) and each variant trains with the optimizer its name says."""
import importlib.util
from pathlib import Path

import pytest

from moelab.run_config import load_config

_SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_sweep.py"
_spec = importlib.util.spec_from_file_location("quality_sweep", _SWEEP)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.mark.parametrize("name", sorted(sweep.VARIANTS))
def test_variant_keeps_active_parameters_and_names_its_optimizer(name):
    recipe, overrides = sweep.VARIANTS[name]
    cfg = load_config(recipe, overrides)
    experts_only = ("optim.expert_lr_mult", "optim.muon_experts")  # refused on a dense model: there are no experts
    dense = load_config("tiny-dense", [o for o in overrides if o.startswith(("optim.", "model.tie_embeddings"))
                                       and not o.startswith(experts_only)])
    assert cfg.optim.name == ("muon" if "muon" in name else "adamw")
    active, dense_active = cfg.model.param_counts()["active"], dense.model.param_counts()["active"]
    moe = cfg.model.moe
    routers = 0 if moe is None else cfg.model.n_layers * moe.n_experts * moe.d_model
    assert active - routers == dense_active, (name, active, dense_active)
