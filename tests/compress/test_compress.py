"""Compression: quantization error bounds and round trips, lossless merging of identical
experts, prune/merge 8 -> 4 that trains on, and distillation's loss and refusals."""
import json

import pytest
import torch

from conftest import write_corpus, TINY, TINY_MOE, run_cli, run_main
from moelab import ConfigError, ModelConfig, MoEConfig, Transformer
from moelab.cli import main
from moelab.compress.distill import attach_teacher, distill_kl
from moelab.compress.experts import reduce_experts
from moelab.model.quant import dequantize_tensor, quantize_tensor
from moelab.store.run import load_run

MOE8 = [*TINY_MOE, "model.moe.n_experts=8", "model.moe.d_expert=32"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    corpus = write_corpus(d / "corpus.txt")
    run_cli("train", "tiny-moe", "--data", str(corpus), "--out", str(d / "run"), "--steps", "40", "--quiet", *MOE8)
    return d / "run", corpus


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantization_error_is_within_half_a_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(3, 24, 64) * 0.05 + torch.linspace(-0.1, 0.1, 64)  # per-expert, per-row groups
    packed, scale, zero = quantize_tensor(w, bits, 16)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() * bits // 8  # really packed
    back = dequantize_tensor(packed, scale, zero, bits, tuple(w.shape))
    err = (back - w).abs().view(3, 24, 4, 16)
    # min-max over each group of 16: step s = range / (2^b - 1); rounding is off by at most s/2
    g = w.view(3, 24, 4, 16)
    step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
    assert bool((err <= step.unsqueeze(-1) * 0.5 * (1 + 2**-9) + 1e-7).all())
    assert float(err.max()) > 0.3 * float(step.max()) * 0.5  # and the error is real, not zero


def test_quantized_checkpoint_round_trip_eval_generate(tmp_path, teacher, capsys):
    run, corpus = teacher
    base = json.loads(run_main(capsys, "eval", str(run), "--data", str(corpus), "--json")[1])
    run_main(capsys, "quantize", str(run), "--bits", "8", "--group-size", "16", "--out", str(tmp_path / "q8"))
    q8 = json.loads(run_main(capsys, "eval", str(tmp_path / "q8"), "--data", str(corpus), "--json")[1])
    assert abs(q8["loss"] / base["loss"] - 1) < 0.01 and q8["loss"] != base["loss"]
    # saved packed, loaded back bit for bit
    r = load_run(tmp_path / "q8")
    w = r.model.layers[0].ffn.experts.parametrizations.w_up.original0
    assert w.dtype == torch.uint8 and r.cfg.quant.bits == 8
    text = run_main(capsys, "generate", str(tmp_path / "q8"), "--prompt", "line 3", "--max-new-tokens", "4",
                   "--temperature", "0")[1]
    assert text.startswith("line 3")
    # moelab memory reports what the quantized weights take resident: the bytes actually stored
    from moelab.model.quant import resident_bytes

    mem = json.loads(run_main(capsys, "memory", str(tmp_path / "q8" / "config.yaml"), "--json")[1])[0]
    assert mem["quantized_weight_bytes"]["total"] == resident_bytes(r.model)
    run_main(capsys, "quantize", str(run), "--bits", "3", "--group-size", "16", "--out", str(tmp_path / "q3"))
    assert load_run(tmp_path / "q3").model.layers[0].ffn.experts.parametrizations.w_up.original0.numel() == (
        8 * 32 * 32 * 3 // 8)
    capsys.readouterr()
    assert main(["quantize", str(run), "--bits", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--bits: expected one of [2, 3, 4, 8], got 5" in capsys.readouterr().err
    assert main(["quantize", str(run), "--bits", "4", "--group-size", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--group-size: 7 does not divide the input size 32" in err and "experts.w_gate" in err


def test_merging_identical_experts_is_lossless():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                      moe=MoEConfig(d_model=16, d_expert=8, n_experts=6, top_k=2, renormalize=True))
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            for name in ("w_gate", "w_up", "w_down"):
                w = getattr(layer.ffn.experts, name)
                w.copy_(w[0].expand_as(w))  # six copies of one expert
    tokens = torch.randint(0, 50, (4, 12))
    for method in ("frequency", "output-cluster", "prune"):
        small = reduce_experts(model, tokens, 3, method).eval()
        assert small.cfg.moe.n_experts == 3 and small.layers[0].ffn.router.weight.shape == (3, 16)
        with torch.no_grad():
            torch.testing.assert_close(small(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cmd", ["prune-experts", "merge-experts"])
def test_prune_or_merge_8_to_4_trains_on(tmp_path, teacher, cmd, capsys):
    run, corpus = teacher
    flag = "--keep" if cmd == "prune-experts" else "--experts"
    run_main(capsys, cmd, str(run), flag, "4", "--calib", str(corpus), "--out", str(tmp_path / "small"))
    import math

    from moelab.inference import evaluate_source
    from moelab.store.checkpoint import latest_checkpoint, model_tensors

    r = load_run(tmp_path / "small")
    assert r.cfg.model.moe.n_experts == 4 and r.model.layers[1].ffn.router.weight.shape[0] == 4
    # it keeps what the model learned: nearer the teacher's loss than a model that knows nothing (ln V)
    ev = json.loads(run_main(capsys, "eval", str(tmp_path / "small"), "--data", str(corpus), "--json")[1])
    taught, knows_nothing = evaluate_source(load_run(run), str(corpus))["loss"], math.log(r.cfg.model.vocab_size)
    midway = (taught + knows_nothing) / 2
    assert taught <= ev["loss"] < midway, (taught, ev["loss"], knows_nothing)
    run_main(capsys, "train", str(tmp_path / "small" / "config.yaml"), "--init", str(tmp_path / "small"), "--data", str(corpus),
            "--out", str(tmp_path / "cont"), "--steps", "4", "--quiet", "train.log_every=1")
    recs = [json.loads(x) for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4] and all(len(x["moe_layers"][0]["load"]) == 4 for x in recs)
    assert recs[0]["lm_loss"] < midway  # training started from the reduced model, not from scratch ...
    before = model_tensors(latest_checkpoint(tmp_path / "small" / "checkpoints"))
    after = model_tensors(latest_checkpoint(tmp_path / "cont" / "checkpoints"))
    assert before.keys() == after.keys()
    assert not torch.equal(before["layers.1.ffn.experts.w_up"], after["layers.1.ffn.experts.w_up"])  # ... and went on


def test_distillation_loss_kl_and_refusal(tmp_path, teacher, capsys):
    run, corpus = teacher
    # at T = 1 and alpha = 0 the training loss is the KL, computed here by hand
    t = load_run(run)
    student = Transformer(t.cfg.model)
    attach_teacher(student, t.model, temperature=1.0, alpha=0.0)
    tokens = torch.randint(0, 300, (2, 9))
    x, y = tokens[:, :-1], tokens[:, 1:]
    student.train()
    out = student(x, y)
    with torch.no_grad():
        p = torch.softmax(t.model(x).logits, -1)
        q = torch.softmax(student(x).logits, -1)  # targets absent: the plain forward
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()
    aux = out.loss - by_hand  # the student's own MoE aux losses stay in
    torch.testing.assert_close(distill_kl(out.logits, t.model(x).logits, y, 1.0), by_hand, atol=1e-5, rtol=1e-5)
    moe_aux = sum(s.aux_loss for s in out.moe_stats) / len(out.moe_stats)
    torch.testing.assert_close(aux, moe_aux, atol=1e-5, rtol=1e-5)

    # a short run lowers the student's KL to the teacher
    dense = [*TINY, "train.log_every=1"]
    run_main(capsys, "distill", str(run), "--student", "tiny-dense", "--data", str(corpus), "--out", str(tmp_path / "d"),
            "--steps", "12", "--temperature", "1", "--alpha", "0", "--quiet", *dense)
    recs = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"], [r["loss"] for r in recs]
    assert load_run(tmp_path / "d").cfg.model.moe is None
    # a student reading other token ids is refused
    run_main(capsys, "train", "tiny-dense", "--data", str(corpus), "--out", str(tmp_path / "other"), "--steps", "2", "--quiet",
            *TINY, "data.tokenizer_train_bytes=20000")
    rc, _, err = run_main(capsys, "distill", str(run), "--student", str(tmp_path / "other"), "--data", str(corpus), "--out",
                         str(tmp_path / "d2"), "--steps", "2", check=False)
    assert rc == 2 and "its tokenizer is not the teacher's" in err
    with pytest.raises(ConfigError, match="--alpha"):
        from moelab.compress.distill import distill
        distill(str(run), "tiny-dense", str(corpus), tmp_path / "d3", alpha=2.0)
