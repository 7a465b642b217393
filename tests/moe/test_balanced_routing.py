"""model.moe.router_override=balanced: the routing frameworks force when they time MoE
layers. Every expert gets the same rows +-1, each token k distinct experts, and the
output is the learned layer's arithmetic with only the assignment changed."""
import random

import torch

from moelab.config import MoEConfig
from moelab.moe import MoE
from moelab.moe.reference import reference_moe
from moelab.moe.router import balanced_assignment


def check_balanced(idx_TK: torch.Tensor, n_experts: int) -> None:
    T, K = idx_TK.shape
    counts = torch.bincount(idx_TK.reshape(-1), minlength=n_experts)
    assert counts.sum() == T * K
    assert int(counts.max()) - int(counts.min()) <= 1, counts
    for row in idx_TK.tolist():
        assert len(set(row)) == K, row  # k distinct experts per token


def test_any_batch_gets_even_loads_and_distinct_experts():
    rng = random.Random(0)
    cases = [(1, 1, 1), (3, 2, 16), (5, 4, 4), (7, 3, 5)]  # more experts than tokens among them
    cases += [(rng.randint(1, 200), None, rng.randint(1, 32)) for _ in range(60)]
    for T, K, E in cases:
        K = K or rng.randint(1, E)
        check_balanced(balanced_assignment(T, K, E), E)


def test_the_layer_keeps_the_learned_arithmetic_and_changes_only_the_assignment():
    torch.manual_seed(0)
    for T, E, K, router in [(13, 8, 2, "softmax"), (3, 16, 4, "sigmoid"), (40, 5, 3, "softmax")]:
        cfg = MoEConfig(d_model=16, d_expert=8, n_experts=E, top_k=K, router=router, router_override="balanced")
        moe = MoE(cfg, backend="loop")
        with torch.no_grad():  # a router with a preference (learned top-k far from even), weights not vanishing
            moe.router.weight.normal_(std=0.3)
            moe.router.weight[0] += 0.5
        x = torch.randn(T, 16)
        seen = {}
        moe.router.register_forward_hook(lambda m, a, out: seen.update(idx=out.expert_idx_TK))
        y, stats = moe(x)
        check_balanced(seen["idx"], E)
        assert int(stats.tokens_per_expert.max()) - int(stats.tokens_per_expert.min()) <= 1
        torch.testing.assert_close(y, reference_moe(moe, x, expert_idx=seen["idx"]), rtol=1e-5, atol=1e-6)
        moe.cfg.router_override = "none"  # the same weights, learned routing: skewed, and a different output
        y_learned, learned = moe(x)
        assert int(learned.tokens_per_expert.max()) - int(learned.tokens_per_expert.min()) > 1
        assert not torch.allclose(y, y_learned)
