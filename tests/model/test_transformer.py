"""The dense/MoE decoder: layer patterns, parameter counts, and that it learns."""
import pytest
import torch

from moelab import ConfigError, ModelConfig, MoEConfig, Transformer


def tiny(moe=True, **kw):
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    base.update(kw)
    if moe:
        base["moe"] = MoEConfig(d_model=base["d_model"], d_expert=32, n_experts=4, top_k=2)
    return ModelConfig(**base)


def test_layer_patterns():
    assert [tiny(moe_pattern="all").is_moe_layer(i) for i in range(4)] == [True] * 4
    assert [tiny(moe_pattern="alternate").is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [tiny(first_dense=1).is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    model = Transformer(tiny(moe_pattern="alternate"))
    assert [layer.is_moe for layer in model.layers] == [False, True, False, True]
    assert len(model(torch.randint(0, 97, (2, 8))).moe_stats) == 2


def test_param_counts_match_hand_count_and_modules():
    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=8,
                      moe=MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, n_shared_experts=1,
                                    shared_gate=True), moe_pattern="alternate")
    # Hand count. Attention: q 16x16, k,v 16x8 each (2 kv heads of dim 4), o 16x16 = 768.
    attn = 16 * 16 + 2 * 16 * 8 + 16 * 16
    norms = 2 * 16
    dense_ffn = 3 * 16 * 48
    router, expert, shared = 4 * 16, 3 * 8 * 16, 3 * 8 * 16 + 16
    emb = 2 * 100 * 16
    total = emb + 16 + 2 * (attn + norms) + dense_ffn + (router + 4 * expert + shared)
    active = emb + 16 + 2 * (attn + norms) + dense_ffn + (router + 2 * expert + shared)
    counts = cfg.param_counts()
    assert counts["total"] == total == sum(p.numel() for p in Transformer(cfg).parameters())
    assert counts["active"] == active
    assert counts["non_embedding"] == total - emb
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert tied.param_counts()["total"] == sum(p.numel() for p in Transformer(tied).parameters()) == total - 1600


def test_flops_per_token_against_a_flop_counter():
    """Measured: torch's FlopCounterMode over a real forward+backward of a dense model
    (it counts every matmul: projections, FFN, head, and their two backward products).
    It does not count SDPA on CPU, so attention is added by hand: per layer and token,
    QK^T and AV cost 2*S*d each forward (the full S x S square), twice that backward,
    so 12*S*d. The formula also counts 6 FLOPs per norm gain, which no matmul does."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny(moe=False)
    B, S, L, d = 2, 16, cfg.n_layers, cfg.d_model
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (B, S))
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, tokens).loss.backward()
    matmul = counter.get_total_flops()
    attention = 12 * S * d * L * B * S
    norm_gains = (2 * L + 1) * d
    assert cfg.flops_per_token(S) * B * S == matmul + attention + 6 * norm_gains * B * S


@pytest.mark.parametrize("moe", [False, True])
def test_overfits_fixed_batch(moe):
    torch.manual_seed(0)
    model = Transformer(tiny(moe=moe))
    tokens = torch.randint(0, 97, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.lm_loss.item()
    assert out.lm_loss.item() < 0.3 * first
    if moe:
        assert out.aux_loss.item() > 0 and len(out.moe_stats) == 4


def test_loss_is_lm_plus_mean_aux():
    """Against the published definitions, computed here from the routers' own outputs:
    cross-entropy of the logits; Switch balance E * sum_e f_e P_e (f over the T*K
    assignments); ST-MoE z-loss mean(logsumexp^2); weighted and averaged over layers."""
    cfg = tiny()
    cfg.moe.lb_coef, cfg.moe.z_coef = 0.03, 0.002
    torch.manual_seed(0)
    model = Transformer(cfg)
    routings = []
    for layer in model.layers:
        layer.ffn.router.register_forward_hook(lambda mod, inp, out: routings.append(out))
    tokens = torch.randint(0, 97, (2, 16))
    out = model(tokens, tokens)
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), tokens.reshape(-1))
    aux = []
    for r in routings:
        T, K = r.expert_idx_TK.shape
        f = torch.stack([(r.expert_idx_TK == e).sum() for e in range(4)]).float() / (T * K)
        lb = 4 * (f * r.probs_TE.mean(0)).sum()
        z = (r.logits_TE.exp().sum(-1).log() ** 2).mean()
        aux.append(0.03 * lb + 0.002 * z)
    assert len(aux) == 4
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.loss, lm + sum(aux) / 4)


def test_causal_and_activation_checkpointing_equivalent():
    torch.manual_seed(0)
    model = Transformer(tiny())
    tokens = torch.randint(0, 97, (2, 16))
    out = model(tokens, tokens)
    # Causality: changing the last token does not change earlier logits.
    t2 = tokens.clone()
    t2[:, -1] = (t2[:, -1] + 1) % 97
    torch.testing.assert_close(model(t2).logits[:, :-1], out.logits[:, :-1])
    calls, saved = [], []
    model.layers[0].register_forward_pre_hook(lambda mod, inp: calls.append(1))  # recompute stops before a post-hook
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = model(tokens, tokens)  # the reference again, counting what it saves for backward
    n_plain, saved[:] = len(saved), []
    model.activation_checkpointing = True
    calls.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out_ck = model(tokens, tokens)
    torch.testing.assert_close(out_ck.loss, out.loss)
    g1 = torch.autograd.grad(out.loss, list(model.parameters()))
    g2 = torch.autograd.grad(out_ck.loss, list(model.parameters()))
    # the flag took effect: the blocks' activations were not kept, and block 0 ran again in backward
    assert len(saved) < n_plain / 2 and len(calls) == 2
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"moe\.top_k.*exceeds n_experts"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"model\.moe\.d_model"):
        ModelConfig(d_model=32, n_heads=4, moe=MoEConfig(d_model=16))


def test_bias_update_through_model():
    cfg = tiny()
    cfg.moe.bias_update_rate = 0.01
    model = Transformer(ModelConfig(**cfg.__dict__))
    out = model(torch.randint(0, 97, (2, 16)))
    model.update_router_biases([s.tokens_per_expert for s in out.moe_stats])
    assert any(m.router.bias.abs().sum() > 0 for m in model.moe_layers())


def test_expert_output_init_scale():
    """Default: experts' w_down ~ N(0, 0.02 / sqrt(2 * n_layers)) like every residual output
    (0.02 / sqrt(8) = 0.00707 here); moe.expert_out_std sets it (Mixtral/OLMoE use 0.02)."""
    torch.manual_seed(0)
    big = dict(vocab_size=97, d_model=64, n_layers=4, n_heads=4, d_ff=64, max_seq_len=32)
    default = Transformer(ModelConfig(**big, moe=MoEConfig(d_model=64, d_expert=128, n_experts=8, top_k=2)))
    plain = Transformer(ModelConfig(**big, moe=MoEConfig(d_model=64, d_expert=128, n_experts=8, top_k=2,
                                                         expert_out_std=0.02)))
    assert abs(default.layers[0].ffn.experts.w_down.std().item() - 0.00707) < 0.0002
    assert abs(default.layers[0].ffn.experts.w_up.std().item() - 0.02) < 0.0005
    assert abs(plain.layers[0].ffn.experts.w_down.std().item() - 0.02) < 0.0005
    with pytest.raises(ConfigError, match="moe.expert_out_std"):
        MoEConfig(d_model=64, d_expert=128, n_experts=8, top_k=2, expert_out_std=-1.0)


def test_tiny_moe_default_aux_loss_by_hand():
    """tiny-moe's balance settings (lb_coef 0.001, no z-loss). With a zero router every
    probability is 1/8 and top-2 picks experts 0 and 1 for every token: f = (1/2, 1/2, 0..),
    P = 1/8 each, so the Switch loss is 8 * (1/2 * 1/8 + 1/2 * 1/8) = 1 and the aux loss
    0.001 * 1 = 0.001 in every layer (the old 0.01 / 0.001 would give 0.01 + 0.001 ln(8)^2)."""
    from moelab.run_config import load_config

    cfg = load_config("tiny-moe").model
    model = Transformer(cfg)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.zero_()
    out = model(torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16)))
    for s in out.moe_stats:
        torch.testing.assert_close(s.aux_loss, torch.tensor(0.001))
    torch.testing.assert_close(out.loss - out.lm_loss, torch.tensor(0.001))
