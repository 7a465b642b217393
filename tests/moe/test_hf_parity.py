"""moelab.MoE equals Hugging Face's sparse MoE blocks given the same weights."""
import pytest
import torch

from moelab import MoE, MoEConfig

import transformers

D, F_EXP, E, K = 32, 16, 8, 2


def hf_block(arch: str, norm_topk_prob: bool = True):
    if arch == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F_EXP, num_local_experts=E, num_experts_per_tok=K)
        return MixtralSparseMoeBlock(cfg), True, 0
    if arch == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F_EXP, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=norm_topk_prob)
        return Qwen3MoeSparseMoeBlock(cfg), norm_topk_prob, 0
    if arch == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock
        cfg = OlmoeConfig(hidden_size=D, intermediate_size=F_EXP, num_experts=E, num_experts_per_tok=K,
                          norm_topk_prob=False)
        return OlmoeSparseMoeBlock(cfg), False, 0
    if arch == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
        cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F_EXP, shared_expert_intermediate_size=24,
                             num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
        return Qwen2MoeSparseMoeBlock(cfg), False, 24
    raise ValueError(arch)


def moelab_from_hf(block, renormalize: bool, d_shared: int) -> MoE:
    cfg = MoEConfig(d_model=D, d_expert=F_EXP, n_experts=E, top_k=K, renormalize=renormalize,
                    n_shared_experts=1 if d_shared else 0, d_shared=d_shared or None, shared_gate=bool(d_shared))
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(block.gate.weight)
        gate_up = block.experts.gate_up_proj  # (E, 2F, D): gate rows first, then up
        moe.experts.w_gate.copy_(gate_up[:, :F_EXP])
        moe.experts.w_up.copy_(gate_up[:, F_EXP:])
        moe.experts.w_down.copy_(block.experts.down_proj)
        if d_shared:
            moe.shared.w_gate.copy_(block.shared_expert.gate_proj.weight)
            moe.shared.w_up.copy_(block.shared_expert.up_proj.weight)
            moe.shared.w_down.copy_(block.shared_expert.down_proj.weight)
            moe.shared.gate.weight.copy_(block.shared_expert_gate.weight)
    return moe


@pytest.mark.parametrize("arch,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False),
                                       ("olmoe", False), ("qwen2_moe", False)])
def test_equals_hf_block(arch, norm):
    torch.manual_seed(0)
    block, renorm, d_shared = hf_block(arch, norm)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.2)
    block.eval()
    moe = moelab_from_hf(block, renorm, d_shared).eval()

    x = torch.randn(2, 9, D, requires_grad=True)
    y_hf = block(x)
    y, _ = moe(x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    gx_hf, = torch.autograd.grad(y_hf, x, g)
    gx, = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, gx_hf, atol=1e-5, rtol=1e-5)


def test_lb_loss_relates_to_hf_by_top_k():
    """HF counts f per token (sums to K); moelab per assignment (sums to 1)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    block, renorm, _ = hf_block("mixtral")
    with torch.no_grad():
        block.gate.weight.normal_(std=0.5)
    moe = moelab_from_hf(block, renorm, 0)
    x = torch.randn(20, D)
    _, stats = moe(x)
    hf = load_balancing_loss_func((x @ block.gate.weight.T,), E, K)
    torch.testing.assert_close(stats.lb_loss * K, hf)
