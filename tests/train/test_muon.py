"""Muon (optim.name=muon): the update of a matrix is a plain Newton-Schulz orthogonalisation
written here, scaled as PyTorch's Muon scales it to match AdamW; an expert stack is updated
expert by expert; the parameters Muon does not take get AdamW's exact update; a stopped
run resumes bitwise with Muon's state. (Two processes with expert parallelism equal one:
tests/parallel/test_distributed_training.py.)"""

import math

import pytest
import torch
from conftest import TINY_MOE
from test_resume import cfg_for, losses

from moelab.run_config import load_config
from moelab.store.checkpoint import latest_checkpoint, load_tensors
from moelab.train import train
from moelab.train.muon import MuonAdamW
from moelab.train.optim import build_optimizer


# Polar Express's degree-5 quintics as the paper prints them (arXiv 2505.16932, Algorithm 1), with its 1.01 safety
PE = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
      (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
      (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
      (3.3184196573706015, -2.488488024314874, 0.51004894012372),
      (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]  # fmt: skip
REFERENCE = {
    "jordan": ([(3.4445, -4.7750, 2.0315)] * 5, 1.0),  # Keller Jordan's Muon
    "polar_express": ([(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PE], 1.01),  # the paper's X / (1.01 |X|)
}


def reference_orthogonalisation(g, kind="jordan"):
    """Quintic Newton-Schulz as Muon's and Polar Express's authors write it, one matrix, float64."""
    coeffs, pad = REFERENCE[kind]
    x = g.double() / (g.double().norm() * pad)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for a, b, c in coeffs:
        m = x @ x.T
        x = a * x + b * m @ x + c * m @ m @ x
    return (x.T if tall else x).float()


def one_step(shape, grad, lr=0.02, wd=0.0, kind="jordan"):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([{"params": [p], "algo": "muon", "weight_decay": wd}], lr=lr, ns_coeffs=kind)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("kind", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 64), (32, 32)])  # plain, transposed, Gram, square
def test_a_matrix_update_is_the_orthogonalised_gradient_at_adamws_rms(shape, kind):
    torch.manual_seed(0)
    g = torch.randn(shape)
    step = one_step(shape, g, kind=kind)
    s = 0.2 * math.sqrt(max(shape))  # the stated rule: AdamW-like RMS, so AdamW's lr carries over
    torch.testing.assert_close(step, -0.02 * s * reference_orthogonalisation(g, kind), atol=1e-5, rtol=1e-4)
    sv = torch.linalg.svdvals(step / (-0.02 * s))
    assert 0.6 < float(sv.min()) and float(sv.max()) < 1.25  # orthogonal "enough": every direction moved alike
    if kind == "jordan":  # PyTorch's own Muon, Jordan's quintic, same scaling rule (bf16 iteration: close, not equal)
        q = torch.nn.Parameter(torch.zeros(shape))
        ref = torch.optim.Muon([q], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        q.grad = g.clone()
        ref.step()
        torch.testing.assert_close(step, q.detach(), atol=0.02 * s * 0.03, rtol=0.05)


def test_an_expert_stack_is_updated_expert_by_expert():
    torch.manual_seed(1)
    g = torch.randn(4, 16, 24) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1)  # experts of unequal scale
    stack = one_step((4, 16, 24), g, wd=0.1)
    for e in range(4):
        torch.testing.assert_close(stack[e], one_step((16, 24), g[e], wd=0.1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            stack[e],
            -0.02 * 0.2 * math.sqrt(24) * reference_orthogonalisation(g[e], "jordan"),
            atol=1e-5,
            rtol=1e-4,
        )
    # and two steps with momentum: still slice by slice
    p3, p2 = torch.nn.Parameter(torch.ones(4, 16, 24)), [torch.nn.Parameter(torch.ones(16, 24)) for _ in range(4)]
    o3 = MuonAdamW([{"params": [p3], "algo": "muon", "weight_decay": 0.1}], lr=0.01)
    o2 = MuonAdamW([{"params": p2, "algo": "muon", "weight_decay": 0.1}], lr=0.01)
    for k in range(2):
        p3.grad = g * (k + 1)
        for e in range(4):
            p2[e].grad = g[e] * (k + 1)
        o3.step()
        o2.step()
    for e in range(4):
        torch.testing.assert_close(p3.detach()[e], p2[e].detach(), atol=1e-6, rtol=1e-5)


def test_muon_takes_matrices_and_experts_and_adamw_the_rest_exactly():
    cfg = load_config("tiny-moe", [*TINY_MOE, "optim.name=muon"])
    torch.manual_seed(0)
    from moelab.model import Transformer

    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert "layers.0.ffn.experts.w_gate" in by["muon"] and "layers.0.attn.wq.weight" in by["muon"]
    assert "layers.0.ffn.router.weight" in by["decay"] and "embed.weight" in by["no_decay"]
    assert not any("norm" in n or n.startswith(("embed.", "lm_head.")) for n in by["muon"])
    # the AdamW side: torch.optim.AdamW's update, step for step, on the same gradients
    ref = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref_opt = torch.optim.AdamW(
        [
            {"params": [ref[n] for n in sorted(by[g])], "weight_decay": wd}
            for g, wd in (("decay", 0.1), ("no_decay", 0.0))
        ],
        lr=cfg.optim.peak_lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        foreach=False,
    )
    for g in opt.param_groups:
        g["lr"] = cfg.optim.peak_lr
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    for _ in range(3):
        opt.zero_grad()
        model(tokens, tokens).loss.backward()
        for n, p in model.named_parameters():
            ref[n].grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for n, p in model.named_parameters():
        if n not in by["muon"]:
            torch.testing.assert_close(p.detach(), ref[n].detach(), atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("experts", ["per_expert", "dion"])  # dion: its bases are state a resume must restore
def test_stop_and_resume_with_muon_is_bitwise_identical(tmp_path, text_file, experts):
    muon = ["optim.name=muon", f"optim.muon_experts={experts}"]
    train(cfg_for(text_file, 8, muon), tmp_path / "a", quiet=True)
    train(cfg_for(text_file, 8, muon), tmp_path / "b", stop_after=4, quiet=True)
    state = load_tensors(latest_checkpoint(tmp_path / "b" / "checkpoints"), "optimizer.safetensors")
    assert any(k.endswith("momentum_buffer") for k in state) and any(k.endswith("exp_avg_sq") for k in state)
    assert any(k.endswith("dion_basis") for k in state) == (experts == "dion")
    train(cfg_for(text_file, 8, muon), tmp_path / "b", resume=True, quiet=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(a[s] == b[s] for s in range(5, 9)), (a, b)
    ma = load_tensors(latest_checkpoint(tmp_path / "a" / "checkpoints"), "model.safetensors")
    mb = load_tensors(latest_checkpoint(tmp_path / "b" / "checkpoints"), "model.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    adamw = losses(tmp_path / "a")  # and Muon is not AdamW under another name
    train(cfg_for(text_file, 8, ["optim.name=adamw"]), tmp_path / "c", quiet=True)
    assert losses(tmp_path / "c")[8] != adamw[8]
