"""Recipes, YAML files and dotted overrides; errors name the dotted key."""
import pytest

from moelab import ConfigError
from moelab.run_config import apply_overrides, list_recipes, load_config


def test_named_recipes_load_and_tiny_pair_has_equal_active_params():
    assert {"tiny-dense", "tiny-moe", "small-dense", "small-moe"} <= set(list_recipes())
    dense, moe = load_config("tiny-dense"), load_config("tiny-moe")
    assert moe.model.moe.n_experts == 8 and moe.model.moe.top_k == 2
    pd, pm = dense.model.param_counts(), moe.model.param_counts()
    router = moe.model.n_layers * 8 * moe.model.d_model
    assert pm["active"] == pd["active"] + router
    assert pm["total"] > 3 * pd["non_embedding"]
    small = load_config("small-moe").model.param_counts()
    assert 2e6 < small["active_non_embedding"] < 1e7


def test_overrides_set_nested_fields_and_parse_values():
    cfg = load_config("tiny-moe", ["model.moe.n_experts=16", "optim.lr=1e-3", "train.precision=bf16",
                                   "model.moe.capacity_factor=null", "data.tokenizer=tok.json"])
    assert cfg.model.moe.n_experts == 16 and cfg.optim.lr == 1e-3 and cfg.train.precision == "bf16"
    assert cfg.model.moe.d_model == cfg.model.d_model
    assert cfg.data.tokenizer == "tok.json"


def test_override_turns_dense_recipe_into_moe():
    cfg = load_config("tiny-dense", ["model.moe.n_experts=4", "model.moe.top_k=1", "model.moe.d_expert=64"])
    assert cfg.model.moe.n_experts == 4 and cfg.model.is_moe_layer(0)


@pytest.mark.parametrize("override,pattern", [
    ("model.moe.n_expert=4", r"model\.moe\.n_expert: unknown key \(did you mean 'n_experts'\?\)"),
    ("train.stepz=3", r"train\.stepz: unknown key"),
    ("model.n_layers=four", r"model\.n_layers: expected an integer, got 'four'"),
    ("model.moe.top_k=9", r"model\.moe\.top_k: top_k=9 exceeds n_experts=8"),
    ("train.precision=fp8", r"train\.precision: expected one of \['auto', 'fp32', 'bf16'\]"),
    ("model.tie_embeddings=2", r"model\.tie_embeddings: expected true or false"),
    ("optim.lr.x=1", r"optim\.lr: is a value, not a section"),
])
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny-moe", [override])


def test_yaml_file_and_unknown_recipe(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  d_model: 64\n  n_heads: 2\n  moe: {n_experts: 4, top_k: 2, d_expert: 32}\n")
    cfg = load_config(str(f))
    assert cfg.name == "mine" and cfg.model.moe.d_model == 64
    f.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"model\.d_modle: unknown key \(did you mean 'd_model'\?\)"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["model.d_model"])
