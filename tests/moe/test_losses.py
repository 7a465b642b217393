"""Router losses on hand-computed examples, and aux-loss-free bias balancing."""
import math

import pytest
import torch

from moelab import MoE, MoEConfig
from moelab.moe import load_balancing_loss, max_violation, router_z_loss


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0], [1]])
    # f = (1/2, 1/2, 0), P = (0.4, 0.4, 0.2) -> 3 * (0.2 + 0.2) = 1.2
    assert load_balancing_loss(probs_TE=probs, expert_idx_TK=idx, n_experts=3).item() == pytest.approx(1.2)
    # top-2: assignments {0,1} and {1,2}: f = (1/4, 2/4, 1/4) -> 3 * (0.1 + 0.2 + 0.05) = 1.05
    idx2 = torch.tensor([[0, 1], [1, 2]])
    assert load_balancing_loss(probs_TE=probs, expert_idx_TK=idx2, n_experts=3).item() == pytest.approx(1.05)


def test_load_balancing_loss_is_one_when_uniform():
    E, T, K = 8, 64, 2
    probs = torch.full((T, E), 1.0 / E)
    idx = torch.arange(T * K).reshape(T, K) % E
    assert load_balancing_loss(probs_TE=probs, expert_idx_TK=idx, n_experts=E).item() == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits_TE=logits).item() == pytest.approx(expected, rel=1e-6)


def test_layer_losses_match_hand_computation():
    cfg = MoEConfig(d_model=4, d_expert=4, n_experts=2, top_k=1, lb_coef=0.5, z_coef=0.25)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 3.0, 0, 0]])
    _, s = moe(x)
    logits = torch.tensor([[2.0, 0], [0, 1.0], [0, 3.0]])
    p = logits.softmax(-1)
    f = torch.tensor([1 / 3, 2 / 3])
    lb = 2 * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(s.lb_loss, lb)
    torch.testing.assert_close(s.z_loss, z)
    torch.testing.assert_close(s.aux_loss, 0.5 * lb + 0.25 * z)
    assert s.tokens_per_expert.tolist() == [1, 2]
    assert s.max_violation.item() == pytest.approx(2 / 1.5 - 1)


def test_losses_have_gradients_to_router_only():
    moe = MoE(MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2))
    _, s = moe(torch.randn(16, 8))
    (s.lb_loss + s.z_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w_up.grad is None


def test_bias_balancing_fixes_a_skewed_router():
    """LM-free toy objective: the router weights are frozen and deliberately skewed
    (expert 0's logit is +1.5 above the others on average); only the aux-loss-free
    bias rule runs, on fresh random tokens each step, as after each optimizer step.
    Success = max-violation falls well below its starting value."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, bias_update_rate=1e-3)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
    mean_dir = torch.ones(16) / 4.0  # tokens share a mean direction ...
    with torch.no_grad():
        moe.router.weight[0] += 1.5 * mean_dir / mean_dir.square().sum()  # ... that expert 0 loves

    def batch():
        return torch.randn(512, 16) * 0.5 + mean_dir

    with torch.no_grad():
        start = moe(batch())[1].max_violation.item()
        for _ in range(300):
            _, s = moe(batch())
            moe.router.update_bias(s.tokens_per_expert)
        end = torch.tensor([moe(batch())[1].max_violation.item() for _ in range(5)]).mean().item()
    assert start > 1.0
    assert end < 0.35 * start, (start, end)
    assert moe.router.bias[0] < 0  # the over-loaded expert was pushed down


def test_max_violation_extremes():
    assert max_violation(torch.tensor([5, 5, 5, 5])).item() == 0
    assert max_violation(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(3.0)


def test_bias_buffer_only_with_balancing():
    assert "router.bias" not in dict(MoE(MoEConfig(d_model=8, d_expert=8)).named_buffers())
    m = MoE(MoEConfig(d_model=8, d_expert=8, bias_update_rate=0.01))
    assert dict(m.named_buffers())["router.bias"].shape == (8,)


def _by_hand_lb(moe, x, counts):
    """E * f . P from the router's own outputs, f from `counts` (worked out here, not by the layer)."""
    r = moe.router(x)
    f = counts.float() / counts.sum()
    return moe.cfg.n_experts * torch.dot(f, r.probs_TE.mean(0))


def test_global_balance_counts_the_step_so_far():
    """balance_scope=global: micro-batch j's f counts the assignments of micro-batches
    0..j of the step; an evaluation pass neither uses nor changes those counts."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, balance_scope="global"))
    x0, x1 = torch.randn(40, 16), torch.randn(24, 16)
    counts = [torch.bincount(moe.router(x).expert_idx_TK.reshape(-1), minlength=4) for x in (x0, x1)]
    moe.start_micro_batch(0)
    _, s0 = moe(x0)
    torch.testing.assert_close(s0.lb_loss, _by_hand_lb(moe, x0, counts[0]))
    moe.eval()
    _, s_eval = moe(x1)  # evaluation: its own tokens only, nothing accumulated
    torch.testing.assert_close(s_eval.lb_loss, _by_hand_lb(moe, x1, counts[1]))
    moe.train()
    moe.start_micro_batch(1)
    _, s1 = moe(x1)
    torch.testing.assert_close(s1.lb_loss, _by_hand_lb(moe, x1, counts[0] + counts[1]))
    moe.start_micro_batch(0)  # a new step starts from zero
    _, s2 = moe(x1)
    torch.testing.assert_close(s2.lb_loss, _by_hand_lb(moe, x1, counts[1]))


def test_bias_update_is_recentred_and_keeps_choices():
    """bias += rate * sign(mean - load), then minus its mean: zero-mean, and the top-k
    choice is the same as with the uncentred bias."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2, bias_update_rate=0.1))
    load = torch.tensor([10.0, 1.0, 1.0, 0.0])  # mean 3: signs -1, +1, +1, +1 (sum 2, not 0)
    moe.router.update_bias(load)
    expected = torch.tensor([-0.1, 0.1, 0.1, 0.1]) - 0.05
    torch.testing.assert_close(moe.router.bias, expected)
    x = torch.randn(32, 8)
    chosen = moe.router(x).expert_idx_TK
    with torch.no_grad():
        moe.router.bias += 0.05  # the uncentred bias
    assert torch.equal(moe.router(x).expert_idx_TK, chosen)


def test_global_balance_reduces_counts_through_the_installed_reducer():
    """The layer knows no process group: what the other data-parallel ranks routed comes
    through `count_reducer` (installed by moelab.parallel), once per micro-batch, and is
    added to the step's counts."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=2, balance_scope="global"))
    other_rank = torch.tensor([30, 0, 2, 0])  # what another rank routed in the same micro-batch
    seen = []

    def reducer(c):
        seen.append(c.clone())
        return c + other_rank

    moe.count_reducer = reducer
    x0, x1 = torch.randn(40, 16), torch.randn(24, 16)
    counts = [torch.bincount(moe.router(x).expert_idx_TK.reshape(-1), minlength=4) for x in (x0, x1)]
    moe.start_micro_batch(0)
    _, s0 = moe(x0)
    torch.testing.assert_close(s0.lb_loss, _by_hand_lb(moe, x0, counts[0] + other_rank))
    moe.start_micro_batch(1)
    _, s1 = moe(x1)
    torch.testing.assert_close(s1.lb_loss, _by_hand_lb(moe, x1, counts[0] + counts[1] + 2 * other_rank))
    assert len(seen) == 2 and torch.equal(seen[1], counts[1])  # this rank's own counts, once a micro-batch
