"""The fast MoE path against the plain reference loop and simple invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

from moelab import MoE, MoEConfig
from moelab.model.blocks import SwiGLU
from moelab.moe.reference import reference_moe


def make_moe(backend="auto", **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"d_model": 16, "d_expert": 8, "n_experts": 4, "top_k": 2, **kw})
    moe = MoE(cfg, backend=backend)
    # Larger weights than the training init so differences are not hidden by tiny outputs.
    moe.reset_parameters(std=0.3)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.5)
    return moe


def grads(moe, x, out):
    g_out = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    params = [x] + [p for p in moe.parameters()]
    return torch.autograd.grad(out, params, g_out, allow_unused=True)


CASES = [
    dict(router="softmax"),
    dict(router="softmax", renormalize=False),
    dict(router="sigmoid"),
    dict(router="softmax", capacity_factor=1.0),
    dict(router="sigmoid", capacity_factor=0.75),
    dict(router="softmax", n_shared_experts=2, d_shared=8),
    dict(router="softmax", n_shared_experts=1, shared_gate=True, capacity_factor=1.05),
    dict(router="softmax", n_experts=8, top_k=4, d_expert=4),  # fine-grained
]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_fast_path_equals_reference(backend, kw):
    moe = make_moe(backend, **kw)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, stats = moe(x)
    y_ref = reference_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads(moe, x, y), grads(moe, x, y_ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    if kw.get("capacity_factor"):
        assert stats.dropped_fraction.item() > 0


def test_eval_capacity_factor_applies_in_eval_mode():
    moe = make_moe(capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(32, 16)
    assert moe(x)[1].dropped_fraction.item() > 0
    moe.eval()
    assert moe(x)[1].dropped_fraction.item() == 0
    torch.testing.assert_close(moe(x)[0], reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_one_expert_top1_dropless_equals_dense_swiglu():
    moe = make_moe(n_experts=1, top_k=1)
    dense = SwiGLU(16, 8)
    with torch.no_grad():
        dense.w_gate.copy_(moe.experts.w_gate[0])
        dense.w_up.copy_(moe.experts.w_up[0])
        dense.w_down.copy_(moe.experts.w_down[0])
    x = torch.randn(5, 16, requires_grad=True)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=1e-6)
    gx, = torch.autograd.grad(y.sum(), x)
    gx_dense, = torch.autograd.grad(dense(x).sum(), x)
    torch.testing.assert_close(gx, gx_dense, atol=1e-6, rtol=1e-6)


def test_backward_accepts_zero_stride_gradient():
    # `.sum()` sends an expanded (stride-0) gradient, which grouped_mm's backward rejects
    # unless something in between materialises it.
    moe = make_moe("grouped_mm")
    x = torch.randn(10, 16, requires_grad=True)
    moe(x)[0].sum().backward()
    assert x.grad is not None and moe.experts.w_down.grad.abs().sum() > 0


def test_capacity_drops_lowest_weight_tokens():
    # Two experts, top-1; every token prefers expert 0 with weight sigmoid(2a), so the
    # capacity of ceil(1.0 * 4 * 1 / 2) = 2 keeps the two tokens with the largest a.
    cfg = MoEConfig(d_model=2, d_expert=4, n_experts=2, top_k=1, renormalize=False, capacity_factor=1.0)
    moe = MoE(cfg)
    moe.reset_parameters(std=0.5)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    a = torch.tensor([0.5, 2.0, 1.0, 3.0])
    x = torch.stack([a, torch.ones(4)], dim=-1)
    y, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [4, 0]
    assert stats.dropped_fraction.item() == pytest.approx(0.5)
    assert torch.all(y[[0, 2]] == 0)
    ex = moe.experts
    for t in (1, 3):
        h = F.silu(ex.w_gate[0] @ x[t]) * (ex.w_up[0] @ x[t])
        expected = torch.sigmoid(2 * a[t]) * (ex.w_down[0] @ h)
        torch.testing.assert_close(y[t], expected)


def test_padding_does_not_change_losses_or_loads():
    moe = make_moe()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    x_padded = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100)
    y, stats = moe(x_padded, mask)
    real = x[mask]
    y_real, stats_real = moe(real)
    torch.testing.assert_close(y[mask], y_real)
    assert torch.all(y[~mask] == 0)
    torch.testing.assert_close(stats.lb_loss, stats_real.lb_loss)
    torch.testing.assert_close(stats.z_loss, stats_real.z_loss)
    assert stats.tokens_per_expert.tolist() == stats_real.tokens_per_expert.tolist()
    torch.testing.assert_close(y, reference_moe(moe, x_padded, mask))


def test_router_runs_in_fp32_under_autocast():
    moe = make_moe()
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = moe.router(x)
    # The values, not just the dtype: a bf16 matmul cast back to fp32 is off by ~1e-3
    # relative; the fp32 reference, computed outside autocast, agrees to fp32 rounding.
    ref_TE = x @ moe.router.weight.T
    assert r.logits_TE.dtype == torch.float32
    torch.testing.assert_close(r.logits_TE, ref_TE, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.probs_TE, ref_TE.softmax(-1), rtol=1e-6, atol=1e-6)
    bf16 = (x.bfloat16() @ moe.router.weight.T.bfloat16()).float()
    assert not torch.allclose(bf16, ref_TE, rtol=1e-6, atol=1e-6)  # the check above can tell them apart


def test_jitter_only_in_training():
    moe = make_moe(jitter=0.5)
    x = torch.randn(64, 16)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe.router(x).logits_TE, moe.router(x).logits_TE)


def test_router_entropy_and_max_violation_reported():
    """Both statistics worked out here from the router's logits (x W^T), not from the
    layer's own counts: a skewed router, then a uniform one."""
    moe = make_moe()
    torch.manual_seed(3)
    x = torch.randn(40, 16) + 0.5
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn_like(moe.router.weight) * 0.5)
        moe.router.weight[0] += 0.5  # expert 0 favoured by the tokens' common direction: far from uniform
    _, stats = moe(x)
    logits = x @ moe.router.weight.T
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    load = torch.bincount(logits.topk(moe.cfg.top_k, dim=-1).indices.reshape(-1), minlength=moe.cfg.n_experts).float()
    assert load.max() / load.mean() - 1 > 0.2 and entropy < math.log(4) - 0.2  # the case is not the uniform one
    assert stats.router_entropy.item() == pytest.approx(entropy.item(), abs=1e-5)
    assert stats.max_violation.item() == pytest.approx((load.max() / load.mean() - 1).item(), abs=1e-6)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: log E
    _, stats = moe(x)
    assert stats.router_entropy.item() == pytest.approx(math.log(4), abs=1e-6)
