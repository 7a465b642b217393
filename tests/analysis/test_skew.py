"""Skew-aware memory: with a trained router's uneven loads, the busiest expert-parallel
rank keeps more activations than the uniform plan; `moelab memory RUN` predicts it from
the run's measured loads and `--measure` checks it in 2 real processes."""
import json

import pytest
from conftest import TINY_MOE, run_main

from moelab.analysis.memory.skew import rank_shares, skewed_activation_bytes
from moelab.config import ModelConfig, MoEConfig


def test_even_loads_add_nothing_and_one_rank_taking_all_adds_its_rows():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))
    even = skewed_activation_bytes(cfg, [[0.25] * 4] * 2, tokens=100, expert_parallel=2)
    assert even["extra"] == [0, 0]
    assert rank_shares([[0.5, 0.5, 0.0, 0.0]], 2) == [[1.0, 0.0]]
    lopsided = skewed_activation_bytes(cfg, [[0.5, 0.5, 0.0, 0.0]] * 2, tokens=100, expert_parallel=2)
    row = 3 * 32 + 4 * 16  # what a routed row keeps where its expert is
    # rank 0 takes the other rank's rows too (100 tokens x k=2 of them per layer), rank 1 none
    assert lopsided["worst_rank"] == 0 and lopsided["extra"] == [4 * 100 * 2 * row * 2, -4 * 100 * 2 * row * 2]


def test_memory_of_a_run_predicts_the_busiest_rank_within_20_percent_of_two_real_processes(tmp_path, text_file,
                                                                                               capsys):
    run = tmp_path / "run"
    run_main(capsys, "train", "tiny-moe", *TINY_MOE, "train.log_every=1", "--data", text_file, "--steps", "6",
             "--out", run, "--quiet")
    _, out, _ = run_main(capsys, "memory", str(run), "--devices", "2", "--expert-parallel", "2", "--micro-batch", "4",
                         "--measure", "--json")
    skew = json.loads(out)[0]["skewed_activations"]
    assert max(skew["rank_max_over_mean"]) > 1.05, skew  # the run's loads are uneven
    assert skew["predicted"] > skew["uniform"]
    measured = max(skew["measured"])
    assert skew["predicted"] == pytest.approx(measured, rel=0.2), skew
    assert measured > skew["uniform"]  # the uniform plan misses what the busiest rank holds
    rc, _, err = run_main(capsys, "memory", str(tmp_path / "nothing"), check=False)
    assert rc == 2 and "nothing" in err
