"""`moelab bench-infer`: the twins it builds and the figures it reports, on tiny configs."""

import json

from moelab import ModelConfig, MoEConfig
from moelab.serve.bench import twins

from conftest import run_main

TINY = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.d_ff=64", "model.max_seq_len=24", "model.moe.d_expert=16", "model.moe.n_experts=4",
        "model.moe.top_k=2", "data.seq_len=24"]  # fmt: skip


def test_twins_have_the_active_and_the_total_parameters_of_the_moe():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=4, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=24, n_experts=6, top_k=2, n_shared_experts=1, d_shared=8))
    (_, model), (_, dense), (_, total) = twins(cfg)
    router = 3 * 6 * 32  # the only parameters the dense models have no counterpart for
    moe = model.param_counts()
    assert dense.param_counts()["total"] == moe["active"] - router
    assert total.param_counts()["total"] == moe["total"] - router
    assert dense.d_ff == 2 * 24 + 8 and total.d_ff == 6 * 24 + 8 and dense.moe is None and total.moe is None
    assert twins(dense) == [("model", dense)]  # a dense model is measured alone


def test_bench_infer_reports_each_model_at_each_batch(capsys):
    _, out, _ = run_main(capsys, "bench-infer", "tiny-moe", *TINY, "--batch", "1,3", "--rounds", "1", "--reference",
                         "--threads", "1", "--json")  # fmt: skip
    rep = json.loads(out)
    assert [r["name"] for r in rep["rows"]] == ["model", "dense twin", "dense total twin"]
    assert rep["context"] == 24 and rep["batches"] == [1, 3]
    for r in rep["rows"]:
        assert r["prefill_tokens_per_s"] > 0 and set(r["decode_tokens_per_s"]) == {"1", "3"}
        # keys and values: 2 layers, batch 3, 1 kv head of 16, 24 positions, fp32
        assert r["kv_cache_bytes"] == 2 * 2 * 3 * 1 * 24 * 16 * 4
        assert r["resident_bytes"] == r["weights_bytes"] + r["kv_cache_bytes"]
    model, dense, total = rep["rows"]
    assert model["weights_bytes"] > dense["weights_bytes"] and model["uncached_tokens_per_s"] > 0
    assert dense["uncached_tokens_per_s"] is None
    _, text, _ = run_main(capsys, "bench-infer", "tiny-moe", *TINY, "--batch", "1", "--rounds", "1")
    assert "its dense twin's tokens/s" in text and "its dense total twin's tokens/s" in text
    rc, _, err = run_main(capsys, "bench-infer", "tiny-moe", "--batch", "0", check=False)
    assert rc == 2 and "--batch" in err
