"""The KV-cached decoder against the uncached reference (the whole prefix again for each token)."""

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model.cache import KVCache
from moelab.model.lora import apply_lora, merge_lora
from moelab.model.quant import quantize_model
from moelab.model.transformer import Transformer
from moelab.serve.decode import CONTEXT, EOS, Sampler, decode, decode_uncached

PROMPTS = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41]]


def _moe(**kw) -> MoEConfig:
    return MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, **kw)


def _model(variant: str) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48)
    cfg = {
        "dense": ModelConfig(**base),
        "moe": ModelConfig(**base, moe=_moe()),
        "shared experts, sigmoid": ModelConfig(
            **base, moe=_moe(n_shared_experts=1, d_shared=16, shared_gate=True, router="sigmoid", renormalize=True)
        ),
        "gqa, qk-norm, qkv bias": ModelConfig(**base, n_kv_heads=2, qk_norm="head", qkv_bias=True, moe=_moe()),
        "lora": ModelConfig(**base, moe=_moe()),
        "lora merged": ModelConfig(**base, moe=_moe()),
        "quantized": ModelConfig(**base, moe=_moe()),
    }[variant]
    model = Transformer(cfg)
    if variant.startswith("lora"):
        apply_lora(model, ["attn", "experts"], rank=4, alpha=8)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave the model unchanged
        if variant == "lora merged":
            merge_lora(model)
    if variant == "quantized":
        quantize_model(model, bits=4, group_size=16, what="all")
    return model.eval()


@pytest.mark.parametrize(
    "variant", ["dense", "moe", "shared experts, sigmoid", "gqa, qk-norm, qkv bias", "lora", "lora merged", "quantized"]
)
def test_cached_batch_equals_uncached_one_at_a_time(variant):
    model = _model(variant)
    got = decode(model, PROMPTS, 10, keep_logits=True)
    for prompt, g in zip(PROMPTS, got, strict=True):
        ref = decode_uncached(model, prompt, 10, keep_logits=True)
        assert g.tokens == ref.tokens
        assert len(g.logits) == len(ref.logits) == 10
        for a, b in zip(g.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batched_equals_each_prompt_alone():
    model = _model("moe")
    together = decode(model, PROMPTS, 8, keep_logits=True)
    for prompt, t in zip(PROMPTS, together, strict=True):
        alone = decode(model, [prompt], 8, keep_logits=True)[0]
        assert t.tokens == alone.tokens
        torch.testing.assert_close(torch.stack(t.logits), torch.stack(alone.logits), atol=1e-5, rtol=1e-5)


def test_eos_and_context_end_a_sequence_and_the_rest_go_on():
    model = _model("moe")
    free = decode(model, PROMPTS, 6)
    eos = free[0].tokens[2]  # the third token the first prompt produces
    ended = decode(model, PROMPTS, 6, eos=eos)
    assert ended[0].finish == EOS and ended[0].tokens == free[0].tokens[:2]
    for f, e in zip(free[1:], ended[1:], strict=True):  # the others are unaffected
        cut = f.tokens.index(eos) if eos in f.tokens else len(f.tokens)
        assert e.tokens == f.tokens[:cut]
    # a 46-token prompt in a 48-token context: three new tokens, then the context is full
    long = decode(model, [list(range(1, 47)), [7]], 10)
    assert long[0].finish == CONTEXT and len(long[0].tokens) == 3
    assert long[0].tokens == decode_uncached(model, list(range(1, 47)), 3).tokens
    assert len(long[1].tokens) == 10


def test_sampling_with_a_seed_repeats_and_top_k_limits_the_choice():
    model = _model("moe")
    a = decode(model, PROMPTS, 8, Sampler(1.0, 3, torch.Generator().manual_seed(4)), keep_logits=True)
    b = decode(model, PROMPTS, 8, Sampler(1.0, 3, torch.Generator().manual_seed(4)))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    for d in a:
        for t, logits in zip(d.tokens, d.logits, strict=True):
            assert t in torch.topk(logits, 3).indices.tolist()


def test_a_cache_refuses_tokens_past_its_capacity():
    model = _model("dense")
    cache = KVCache(model.cfg.n_layers, 1, 8)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(Exception, match="KV cache holds 8 positions"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_generate_cli_batches_prompts_stops_at_a_string_and_equals_the_reference(tmp_path, text_file, capsys):
    import json

    from conftest import TINY_MOE, run_main

    run = tmp_path / "run"
    run_main(capsys, "train", "tiny-moe", "--data", str(text_file), "--out", str(run), "--steps", "6", "--quiet",
             *TINY_MOE)  # fmt: skip
    prompts = ["line 3: the quick", "the lazy dog", "", "line 1"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--json", "--ignore-eos"]

    def gen(*args):
        return [json.loads(x) for x in run_main(capsys, "generate", str(run), *args)[1].splitlines()]

    batched = gen("--prompts", str(tmp_path / "p.jsonl"), *greedy)
    assert [b["prompt"] for b in batched] == prompts and all(b["tokens"] == 12 for b in batched)
    for p, b in zip(prompts, batched, strict=True):
        assert gen("--prompt", p, *greedy, "--no-cache") == [b]  # one at a time, no cache: the same text
    stop = batched[0]["completion"][3:6]  # text the first continuation holds: it ends there, cut before it
    cut = gen("--prompts", str(tmp_path / "p.jsonl"), *greedy, "--stop", stop)
    assert cut[0]["finish"] == "stop" and cut[0]["completion"] == batched[0]["completion"][:3]
    for c, b in zip(cut[1:], batched[1:], strict=True):
        i = b["completion"].find(stop)
        assert c["completion"] == (b["completion"] if i < 0 else b["completion"][:i])
    rc, _, err = run_main(capsys, "generate", str(run), "--prompts", str(tmp_path / "none.txt"), check=False)
    assert rc == 2 and "--prompts" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_main(capsys, "generate", str(run), check=False)
    assert rc == 2 and "--prompt/--prompts" in err
