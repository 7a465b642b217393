"""Documented trainer and CLI features, each checked against an independent expectation:
grad accumulation, schedules, activation checkpointing, bf16, expert dropout, health
warnings in the metrics, eval --split all, greedy generation, compare --tokens."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, TINY_MOE, run_cli
from moelab.cli import main
from moelab.store.run import load_run
from moelab.run_config import load_config
from moelab.store.checkpoint import latest_checkpoint
from moelab.train import train


def cfg_for(recipe, data, steps, extra=()):
    cfg = load_config(recipe, [*(TINY_MOE if recipe == "tiny-moe" else TINY), "train.log_every=1", *extra])
    cfg.data.source, cfg.train.steps = str(data), steps
    return cfg


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def test_grad_accum_equals_the_larger_batch(tmp_path, text_file):
    """Two micro-batches of 4 are the same 8 sequences, in order, as one batch of 8, and
    the dense LM loss is a mean over equal-sized micro-batches: the same update."""
    train(cfg_for("tiny-dense", text_file, 3, ["train.batch_size=8"]), tmp_path / "one", quiet=True)
    train(cfg_for("tiny-dense", text_file, 3, ["train.batch_size=4", "train.grad_accum=2"]), tmp_path / "acc",
          quiet=True)
    a, b = records(tmp_path / "one"), records(tmp_path / "acc")
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5) and ra["tokens"] == rb["tokens"]
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "acc")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_constant_schedule_holds_the_peak_after_warmup(tmp_path, text_file):
    train(cfg_for("tiny-dense", text_file, 6, ["optim.schedule=constant", "optim.lr=0.002",
                                               "optim.warmup_steps=2"]), tmp_path / "run", quiet=True)
    assert [r["lr"] for r in records(tmp_path / "run")] == [0.001, 0.002, 0.002, 0.002, 0.002, 0.002]


def count_training_calls(calls: list):
    """prepare_model hook: append to `calls` each time block 0 runs in training mode (its
    forward, and again its recompute in backward under activation checkpointing)."""
    def prepare(model):
        # a pre-hook: checkpointing's recompute stops early, before a forward hook would fire
        model.layers[0].register_forward_pre_hook(lambda mod, inp: calls.append(1) if mod.training else None)
    return prepare


def test_activation_checkpointing_through_the_trainer_changes_nothing(tmp_path, text_file):
    plain_calls, ck_calls = [], []
    train(cfg_for("tiny-moe", text_file, 3), tmp_path / "plain", quiet=True,
          prepare_model=count_training_calls(plain_calls))
    train(cfg_for("tiny-moe", text_file, 3, ["train.activation_checkpointing=true"]), tmp_path / "ckpt", quiet=True,
          prepare_model=count_training_calls(ck_calls))
    assert len(plain_calls) == 3 and len(ck_calls) == 6  # the flag took effect: each block recomputed once
    for ra, rb in zip(records(tmp_path / "plain"), records(tmp_path / "ckpt"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tmp_path, text_file):
    train(cfg_for("tiny-moe", text_file, 2), tmp_path / "fp32", quiet=True)
    train(cfg_for("tiny-moe", text_file, 2, ["train.precision=bf16"]), tmp_path / "bf16", quiet=True)
    a, b = records(tmp_path / "fp32"), records(tmp_path / "bf16")
    assert a[0]["loss"] != b[0]["loss"]  # bf16 really ran (its rounding shows) ...
    assert abs(a[0]["loss"] - b[0]["loss"]) < 0.05  # ... and stays near fp32 at step 1


def test_expert_dropout_acts_in_training_only():
    from moelab import MoE, MoEConfig
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_expert=32, n_experts=4, top_k=2, expert_dropout=0.5))
    x = torch.randn(64, 16)
    moe.eval()
    ref, _ = moe(x)
    no_drop = MoE(MoEConfig(d_model=16, d_expert=32, n_experts=4, top_k=2))
    no_drop.load_state_dict(moe.state_dict())
    no_drop.eval()
    torch.testing.assert_close(no_drop(x)[0], ref)  # eval: dropout off, the same layer
    moe.train()
    y1, _ = moe(x)
    y2, _ = moe(x)
    assert not torch.allclose(y1, ref) and not torch.allclose(y1, y2)  # train: random units dropped
    # inverted dropout keeps the expected output: the mean over many draws approaches eval's
    mean = torch.stack([moe(x)[0] for _ in range(400)]).mean(0)
    assert (mean - ref).abs().mean() < 0.15 * ref.abs().mean()


def test_spike_and_collapse_warnings_reach_the_metrics(tmp_path, text_file):
    def prepare(model):
        calls = {"n": 0}

        def hook(mod, inp, out):
            if mod.training:
                calls["n"] += 1
                if calls["n"] == 5:
                    out.loss = out.loss * 5
            return out
        model.register_forward_hook(hook)
    train(cfg_for("tiny-moe", text_file, 6, ["train.spike_window=3", "train.collapse_max_violation=0.0",
                                             "train.collapse_window=2"]), tmp_path / "run", quiet=True,
          prepare_model=prepare)
    recs = records(tmp_path / "run")
    warnings = {r["step"]: r.get("warnings", []) for r in recs}
    assert any("loss spike at step 5" in w for w in warnings[5]) and recs[4]["loss_spikes"] == 1
    assert any("router collapse in MoE layer 0 at step 2" in w for w in warnings[2])


def test_eval_split_all_counts_every_document(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    train(cfg_for("tiny-dense", text_file, 2), run, quiet=True)
    tok = load_run(run).tokenizer
    text = text_file.read_text()
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)]  # the text-file rule: 200 lines
    n = sum(len(tok.encode(b, add_special_tokens=False).ids) + 1 for b in blocks)  # + end-of-text each
    S = 32
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(text_file), "--split", "all", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["tokens"] == (n - 1) // S * S
    assert main(["eval", str(run), "--data", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] < ev["tokens"]


def test_greedy_generate_is_argmax_by_hand(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    train(cfg_for("tiny-dense", text_file, 2), run, quiet=True)
    r = load_run(run)
    ids = r.tokenizer.encode("the quick", add_special_tokens=False).ids
    for _ in range(4):
        with torch.no_grad():
            ids.append(int(r.model(torch.tensor([ids])).logits[0, -1].argmax()))
    for seed in ("0", "7"):  # greedy ignores the seed
        capsys.readouterr()
        assert main(["generate", str(run), "--prompt", "the quick", "--temperature", "0",
                     "--max-new-tokens", "4", "--seed", seed]) == 0
        assert capsys.readouterr().out.rstrip("\n") == r.tokenizer.decode(ids)


def test_compare_with_a_token_budget(tmp_path, text_file):
    sets = [a for o in TINY for a in ("--set", o)]
    budget = 4 * 32 * 5  # five steps of 4 x 32 tokens
    run_cli("compare", "tiny-dense", "tiny-moe", "--data", str(text_file), "--out", str(tmp_path / "cmp"),
            "--tokens", str(budget), "--quiet", *sets)
    for name in ("tiny-dense", "tiny-moe"):
        last = records(tmp_path / "cmp" / "runs" / name)[-1]
        assert last["step"] == 5 and last["tokens"] == budget


def test_router_bias_is_not_touched_by_evaluation(tmp_path, text_file):
    """The aux-loss-free bias moves after optimizer steps only: evaluating every step
    leaves the biases (and losses) of a run exactly as evaluating never."""
    extra = ["model.moe.bias_update_rate=0.01", "model.moe.balance_scope=global"]
    train(cfg_for("tiny-moe", text_file, 4, [*extra, "train.eval_every=1"]), tmp_path / "a", quiet=True)
    train(cfg_for("tiny-moe", text_file, 4, [*extra, "train.eval_every=100"]), tmp_path / "b", quiet=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    biases = [k for k in a if k.endswith("router.bias")]
    assert biases and all(float(a[k].abs().sum()) > 0 for k in biases)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_global_balance_survives_activation_checkpointing(tmp_path, text_file):
    """Recomputing a block in backward must not count its tokens twice in the global
    balance counts (nor call a collective twice): same run with and without it."""
    extra = ["model.moe.balance_scope=global", "train.grad_accum=2", "model.moe.lb_coef=0.1"]
    calls_a, calls_b = [], []
    train(cfg_for("tiny-moe", text_file, 2, extra), tmp_path / "a", quiet=True,
          prepare_model=count_training_calls(calls_a))
    train(cfg_for("tiny-moe", text_file, 2, [*extra, "train.activation_checkpointing=true"]), tmp_path / "b",
          quiet=True, prepare_model=count_training_calls(calls_b))
    assert len(calls_a) == 4 and len(calls_b) == 8  # 2 steps x 2 micro-batches, recomputed once under checkpointing
    la = [r["loss"] for r in records(tmp_path / "a")]
    assert la == pytest.approx([r["loss"] for r in records(tmp_path / "b")], abs=1e-6)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_compile_matches_eager(tmp_path, text_file):
    """train.compile=true (dense blocks whole, the attention of MoE blocks) trains the
    same run as eager mode, to fp32 reordering noise."""
    from torch._dynamo.utils import counters

    extra = ["model.moe_pattern=alternate"]
    counters.clear()
    train(cfg_for("tiny-moe", text_file, 3, extra), tmp_path / "eager", quiet=True)
    assert counters["stats"]["unique_graphs"] == 0
    train(cfg_for("tiny-moe", text_file, 3, [*extra, "train.compile=true"]), tmp_path / "compiled", quiet=True)
    assert counters["stats"]["unique_graphs"] >= 2  # the flag took effect: the dense block and an attention compiled
    eager = [r["loss"] for r in records(tmp_path / "eager")]
    assert len(eager) == 3
    assert [r["loss"] for r in records(tmp_path / "compiled")] == pytest.approx(eager, abs=1e-4)


def test_a_slow_evaluation_is_not_charged_to_training_seconds(tmp_path, text_file, monkeypatch):
    """Training seconds (`elapsed_s`, what compare's clock figures read) count optimizer steps only: evaluation and
    checkpoint writing are timed apart (`eval_s`, `ckpt_s`). An evaluation made 0.25 s slower must land there."""
    import time

    import moelab.train.trainer as trainer

    real = trainer.evaluate

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow)
    t0 = time.perf_counter()
    train(cfg_for("tiny-dense", text_file, 8, ["train.eval_every=2"]), tmp_path / "run", quiet=True)
    wall = time.perf_counter() - t0
    recs = records(tmp_path / "run")
    evals = sum("val_loss" in r for r in recs)
    assert evals == 4
    last = recs[-1]
    assert last["eval_s"] >= 0.25 * evals and last["ckpt_s"] > 0  # the sleeps are there, at least
    assert last["elapsed_s"] + last["eval_s"] + last["ckpt_s"] <= wall  # and nowhere else: three disjoint spans
    assert last["machine"] and all(r["eval_s"] <= last["eval_s"] for r in recs)  # cumulative, named machine
