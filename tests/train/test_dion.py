"""Dion's low-rank update for the routed experts (optim.muon_experts=dion): each expert's step is the paper's
Algorithm 1 written here per matrix in float64; at full rank the error feedback keeps mu of the momentum; an expert
no token reached is not moved; the rest of the model keeps Muon's and AdamW's updates; a stopped run resumes bitwise
with the basis in its checkpoint (tests/train/test_muon.py); the memory plan counts the basis
(tests/analysis/test_memory.py); two processes with expert parallelism equal one
(tests/parallel/test_distributed_training.py)."""

import math

import pytest
import torch
from conftest import TINY_MOE

from moelab.errors import ConfigError
from moelab.run_config import load_config
from moelab.train.muon import MuonAdamW
from moelab.train.optim import build_optimizer


def reference_step(m, g, q, mu):
    """Dion (arXiv 2504.05295, Algorithm 1) on one matrix in float64, oriented with its short side first:
    B = M + G; P = orth(B Q); R = B^T P; M' = B - (1 - mu) P R^T; Q' = R with unit columns; update P Q'^T."""
    tall = m.shape[0] > m.shape[1]
    b = (m + g).double()
    b = b.T if tall else b
    p, _ = torch.linalg.qr(b @ q.double())
    r = b.T @ p
    m_new = b - (1 - mu) * p @ r.T
    q_new = r / r.norm(dim=0)
    u = p @ q_new.T
    return (m_new.T if tall else m_new), q_new, (u.T if tall else u)


def dion_opt(p, lr, wd, fraction=0.25, mu=0.95):
    opt = MuonAdamW([{"params": [p], "algo": "dion", "weight_decay": wd, "rank_fraction": fraction}], lr=lr,
                    momentum=mu)  # fmt: skip
    opt.ensure_state()
    return opt


@pytest.mark.parametrize("shape", [(3, 24, 40), (3, 40, 24)])  # w_down-like and w_gate-like expert stacks
def test_an_expert_stack_takes_the_papers_step_expert_by_expert(shape):
    torch.manual_seed(0)
    lr, wd, mu = 0.02, 0.1, 0.9
    w0 = torch.randn(shape)
    p = torch.nn.Parameter(w0.clone())
    opt = dion_opt(p, lr, wd, mu=mu)
    a, b = sorted(shape[-2:])
    r = round(0.25 * a)
    q0 = torch.randn(shape[0], b, r)  # a start of the test's own, set into the state
    opt.state[p]["dion_basis"].copy_(q0)
    assert opt.state[p]["dion_basis"].shape == (shape[0], b, r)
    w, m, q = w0.double(), torch.zeros(shape, dtype=torch.float64), q0.double()
    for _ in range(3):
        g = torch.randn(shape)
        p.grad = g.clone()
        opt.step()
        steps = [reference_step(m[e], g[e].double(), q[e], mu) for e in range(shape[0])]
        m = torch.stack([s[0] for s in steps])
        q = torch.stack([s[1] for s in steps])
        u = torch.stack([s[2] for s in steps])
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(shape[-2:])) * u  # Muon's spectral step, AdamW's RMS rule
    torch.testing.assert_close(p.detach().double(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 24, 40), (3, 40, 24)])
def test_a_bf16_stack_steps_as_its_fp32_copy_and_leaves_the_gradient_alone(shape):
    # the step works on an fp32 momentum in place; a bf16 one is stepped on an fp32 copy and written back, and
    # neither path may write into the gradient it reads (PyTorch PR #190597 was such an aliasing bug in Muon)
    from moelab.train import dion

    torch.manual_seed(4)
    g16 = torch.randn(shape).bfloat16()
    m16 = (0.1 * torch.randn(shape)).bfloat16()
    q = dion.initial_basis(shape, 0.25, torch.device("cpu"))
    m32, q32, q16 = m16.float(), q.clone(), q.clone()
    g_before = g16.clone()
    u32 = dion.step(m32, g16.float(), q32, 0.9)
    u16 = dion.step(m16, g16, q16, 0.9)
    assert torch.equal(g16, g_before) and m16.dtype == torch.bfloat16
    torch.testing.assert_close(u16, u32, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q16, q32, atol=1e-6, rtol=1e-5)
    assert torch.equal(m16, m32.bfloat16())


def test_at_full_rank_the_feedback_keeps_mu_of_the_momentum():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(2, 16, 32))
    opt = dion_opt(p, lr=0.01, wd=0.0, fraction=1.0, mu=0.9)
    g = torch.randn(2, 16, 32)
    p.grad = g.clone()
    opt.step()
    # P spans every column of B at full rank, so P R^T = P P^T B = B and the update takes all of it but mu's share
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.9 * g, atol=1e-5, rtol=1e-5)
    sv = torch.linalg.svdvals(p.detach().double())
    assert float(sv.min()) > 0  # a full-rank step


def test_an_expert_no_token_reached_is_not_moved():
    torch.manual_seed(2)
    w0 = torch.randn(4, 16, 24)
    p = torch.nn.Parameter(w0.clone())
    opt = dion_opt(p, lr=0.05, wd=0.0)
    q0 = opt.state[p]["dion_basis"].clone()
    g = torch.randn(4, 16, 24)
    g[2] = 0  # expert 2 was routed no token, and has no momentum yet
    p.grad = g
    opt.step()
    assert torch.equal(p.detach()[2], w0[2]) and torch.equal(opt.state[p]["dion_basis"][2], q0[2])
    assert not torch.equal(p.detach()[1], w0[1])


def test_only_the_routed_experts_take_dion():
    cfg = load_config("tiny-moe", [*TINY_MOE, "optim.name=muon", "optim.muon_experts=dion"])
    from moelab import Transformer

    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["algo"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups if g["algo"] != "adamw"}
    assert by["dion"] and all(".experts." in n for n in by["dion"])
    assert "layers.0.attn.wq.weight" in by["muon"] and not any(".experts." in n for n in by["muon"])


def test_config_refuses_dion_where_it_cannot_work():
    with pytest.raises(ConfigError, match="optim.dion_rank"):
        load_config("tiny-moe", ["optim.muon_experts=dion", "optim.dion_rank=0"])
    with pytest.raises(ConfigError, match="optim.muon_experts"):
        load_config("tiny-moe", ["optim.muon_experts=dion", "parallel.data_shard=2"])
    with pytest.raises(ConfigError, match="optim.muon_experts=dion: the model has no routed experts"):
        load_config("tiny-dense", ["optim.muon_experts=dion"])
