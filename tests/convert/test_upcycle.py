"""Dense -> MoE upcycling: exact at step 0, trains, and the CLI round trip."""
import json

import pytest
import torch

from conftest import TINY, run_main
from moelab import ConfigError, ModelConfig, Transformer
from moelab.convert.upcycle import upcycle
from moelab.store.run import load_run


def dense_model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=60, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("experts,top_k,granularity", [(8, 2, 1), (4, 1, 2), (4, 2, 4)])
def test_zero_router_upcycle_equals_dense(experts, top_k, granularity):
    dense = dense_model()
    moe = upcycle(dense, experts, top_k, granularity=granularity).eval()
    assert moe.cfg.moe.n_experts == experts * granularity and moe.cfg.moe.top_k == top_k * granularity
    tokens = torch.randint(0, 60, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)


def test_alternate_pattern_noise_and_router_inits():
    dense = dense_model()
    moe = upcycle(dense, 4, 2, pattern="alternate", noise=0.01, router_init="normal")
    assert [layer.is_moe for layer in moe.layers] == [False, True]
    w = moe.layers[1].ffn.experts.w_up
    assert not torch.equal(w[0], w[1])  # noise broke the symmetry
    assert moe.layers[1].ffn.router.weight.abs().sum() > 0
    prompts = [torch.randint(0, 60, (5,)) for _ in range(4)]
    hid = upcycle(dense, 4, 2, router_init="hidden", prompts=prompts)
    rows = hid.layers[0].ffn.router.weight
    assert torch.allclose(rows.norm(dim=-1), torch.ones(4))
    with pytest.raises(ConfigError, match="one prompt per expert"):
        upcycle(dense, 4, 2, router_init="hidden", prompts=prompts[:2])
    with pytest.raises(ConfigError, match="granularity 5 does not divide"):
        upcycle(dense, 4, 2, granularity=5)


def test_drop_upcycling_redraws_a_share_of_each_experts_units_from_the_dense_statistics():
    dense = dense_model()
    moe = upcycle(dense, 8, 2, drop_ratio=0.25, seed=3)
    F = dense.cfg.d_ff
    for i, layer in enumerate(moe.layers):
        src, ex = dense.layers[i].ffn, layer.ffn.experts
        dropped = []
        for e in range(8):
            # a unit is kept whole (its w_gate row, w_up row and w_down column all the dense copy's) or redrawn whole
            same = [(torch.equal(ex.w_gate[e, u], src.w_gate[u]), torch.equal(ex.w_up[e, u], src.w_up[u]),
                     torch.equal(ex.w_down[e][:, u], src.w_down[:, u])) for u in range(F)]
            assert all(len(set(t)) == 1 for t in same)
            gone = {u for u, t in enumerate(same) if not t[0]}
            assert len(gone) == round(0.25 * F)
            dropped.append(gone)
        assert len({frozenset(d) for d in dropped}) > 1  # each expert draws its own units
        new = torch.cat([ex.w_up.detach()[e, sorted(d)].flatten() for e, d in enumerate(dropped)])
        ref = src.w_up.detach()
        assert abs(float(new.mean()) - float(ref.mean())) < 0.01
        assert float(new.std()) == pytest.approx(float(ref.std()), rel=0.1)
    with pytest.raises(ConfigError, match="--drop-ratio"):
        upcycle(dense, 4, 2, drop_ratio=1.5)


def test_upcycled_model_trains():
    dense = dense_model()
    moe = upcycle(dense, 4, 2, noise=0.01).train()
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    x = torch.randint(0, 60, (4, 13))
    losses = []
    for _ in range(15):
        out = moe(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_cli_train_upcycle_continue(tmp_path, text_file, capsys):
    dense_run = tmp_path / "dense"
    run_main(capsys, "train", "tiny-dense", "--data", str(text_file), "--out", str(dense_run), "--steps", "4", "--quiet", *TINY)
    up = tmp_path / "up"
    run_main(capsys, "upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(up))
    d, m = load_run(dense_run), load_run(up)
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(m.model(tokens).logits, d.model(tokens).logits, atol=1e-5, rtol=1e-5)
    assert m.cfg.optim.lr == d.cfg.optim.lr and m.cfg.train.batch_size == d.cfg.train.batch_size
    cont = tmp_path / "cont"
    run_main(capsys, "train", str(up / "config.yaml"), "--init", str(up), "--data", str(text_file), "--out", str(cont),
            "--steps", "4", "--quiet")
    rec = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    assert len(rec[-1]["moe_layers"]) == 2
    # Its first loss is the dense model's loss, not a fresh model's ~log(vocab).
    first_dense = json.loads((dense_run / "metrics.jsonl").read_text().splitlines()[-1])["lm_loss"]
    assert rec[0]["lm_loss"] < first_dense + 0.5

    # --first-dense keeps the first layer's FFN dense (a copy); --router-init hidden with
    # --prompts makes each router row the unit-norm mean FFN input of its prompt.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\n\nclass Foo:\n\nimport os\n\nreturn x + y\n")
    up2 = tmp_path / "up2"
    run_main(capsys, "upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(up2), "--first-dense", "1",
            "--router-init", "hidden", "--prompts", str(prompts))
    m2 = load_run(up2).model
    assert [layer.is_moe for layer in m2.layers] == [False, True]
    torch.testing.assert_close(m2.layers[0].ffn.w_up, d.model.layers[0].ffn.w_up)
    rows = m2.layers[1].ffn.router.weight
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(4))
    captured = []
    hook = d.model.layers[1].ffn_norm.register_forward_hook(lambda mod, i, o: captured.append(o[0].mean(0)))
    ids = load_run(dense_run).tokenizer.encode("class Foo:").ids
    with torch.no_grad():
        d.model(torch.tensor([ids]))
    hook.remove()
    torch.testing.assert_close(rows[1], captured[0] / captured[0].norm())
    rc, _, err = run_main(capsys, "upcycle", str(dense_run), "--experts", "3", "--top-k", "2", "--out", str(tmp_path / "u3"),
                         "--router-init", "hidden", "--prompts", str(prompts), check=False)
    assert rc == 2 and "one prompt per expert (3), got 4" in err
