"""Import from and export to Hugging Face folders, for seven architectures, offline."""
import json

import pytest
import torch

from moelab import ConfigError, ModelConfig, MoEConfig, Transformer
from moelab.convert.io import export_hf, import_hf, read_hf
from moelab.store.run import load_run

import transformers

BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                         "sliding_window": None}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24, "decoder_sparse_step": 1, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8,
        "norm_topk_prob": True, "mlp_only_layers": [0]}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
}


def make_hf(arch, tmp_path):
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms catch mapping slips
            else:
                p.normal_(std=0.2)
    path = tmp_path / arch
    model.save_pretrained(path)
    return model.eval(), path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_then_export_matches_transformers(arch, tmp_path):
    hf, path = make_hf(arch, tmp_path)
    tokens = torch.randint(0, 96, (2, 12))
    ours, mt = read_hf(path)
    assert mt == arch
    ours.eval()
    with torch.no_grad():
        ref = hf(tokens).logits
        torch.testing.assert_close(ours(tokens).logits, ref, atol=1e-4, rtol=1e-4)

    # Round trip through moelab's own folder format, then back out to HF.
    run = import_hf(path, tmp_path / "ckpt")
    loaded = load_run(run)
    out = export_hf(loaded.model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # Dense models export as Llama (Mistral without a sliding window computes the same).
    expected = "LlamaForCausalLM" if arch == "mistral" else type(hf).__name__
    assert type(back).__name__ == expected
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ref, atol=1e-4, rtol=1e-4)
    for m in (hf, back):  # no early stop at an end-of-text id: compare 6 greedy tokens
        m.generation_config.eos_token_id = None
    g_ref = hf.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    g_back = back.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert g_ref.shape[1] == 11
    assert torch.equal(g_ref, g_back)
    # Our greedy continuation agrees as well.
    seq = tokens[:1, :5]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, ours(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, g_ref)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen3_moe"])
def test_aux_loss_agrees_with_transformers(arch, tmp_path):
    hf, path = make_hf(arch, tmp_path)
    ours, _ = read_hf(path)
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        hf_out = hf(tokens, output_router_logits=True)
        stats = ours(tokens).moe_stats
    # transformers concatenates every MoE layer's router logits and computes one loss
    # counting assignments per token (K times moelab's per-assignment normalisation).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    k = ours.cfg.moe.top_k
    ref = load_balancing_loss_func(hf_out.router_logits, ours.cfg.moe.n_experts, k)
    torch.testing.assert_close(hf_out.aux_loss, ref)
    # Same per-layer value when each layer is taken alone.
    for layer_logits, s in zip(hf_out.router_logits, stats):
        torch.testing.assert_close(s.lb_loss * k, load_balancing_loss_func((layer_logits,), ours.cfg.moe.n_experts, k))


def test_moelab_trained_moe_exports(tmp_path):
    cfg = ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 80, (4, 17))
    for _ in range(5):
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    out = export_hf(model.eval(), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_refusals(tmp_path):
    hf, path = make_hf("llama", tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="only pickle weights.*refuses"):
        read_hf(path)
    (path / "pytorch_model.bin").rename(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    for patch, msg in [({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
                       ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope scaling 'llama3'"),
                       ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention"),
                       ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                       ({"attention_bias": True}, "attention_bias"),
                       ({"mlp_bias": True}, "mlp_bias"),
                       ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
                       ({"head_dim": 16}, "head_dim=16"),
                       ({"hidden_size": None}, "hidden_size|wrong type"),
                       ({"num_hidden_layers": None, "hidden_size": 32}, "n_layers: expected a positive integer")]:
        (path / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(ConfigError, match=msg):
            read_hf(path)
    sig = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                  moe=MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, router="sigmoid")))
    with pytest.raises(ConfigError, match="router 'sigmoid'"):
        export_hf(sig, tmp_path / "x")
    nogate = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                     moe=MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, n_shared_experts=1)))
    with pytest.raises(ConfigError, match="shared experts without a gate"):
        export_hf(nogate, tmp_path / "y")


def test_export_arch_choice(tmp_path, capsys):
    """--arch picks among compatible targets: a plain dense model loads in transformers as
    Mistral (sliding window off) with equal logits; an MoE target for it is refused."""
    from conftest import run_main
    model, path = make_hf("llama", tmp_path)
    run = import_hf(path, tmp_path / "run")
    run_main(capsys, "export", str(run), "--out", str(tmp_path / "as_mistral"), "--arch", "mistral")
    cfg = json.loads((tmp_path / "as_mistral" / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg.get("sliding_window") is None
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as_mistral").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens).logits, atol=1e-4, rtol=1e-4)
    rc, _, err = run_main(capsys, "export", str(run), "--out", str(tmp_path / "as_mixtral"), "--arch", "mixtral", check=False)
    assert rc == 2 and "--arch mixtral: this model needs llama" in err


def test_cli_export_of_trained_run(tmp_path, text_file, capsys):
    from conftest import TINY_MOE, run_main
    run = tmp_path / "run"
    run_main(capsys, "train", "tiny-moe", "--data", str(text_file), "--out", str(run), "--steps", "4", "--quiet", *TINY_MOE)
    _, out, _ = run_main(capsys, "export", str(run), "--out", str(tmp_path / "hf"))
    assert "(mixtral)" in out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (tmp_path / "hf" / f).is_file(), f
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("def main(x):\n    return x", return_tensors="pt").input_ids
    ours = load_run(run).model
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    rc, _, err = run_main(capsys, "import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert load_run(tmp_path / "back").tokenizer is not None
