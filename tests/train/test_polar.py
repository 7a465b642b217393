"""Muon's orthogonalisation (moelab.train.polar): Polar Express's five steps leave no singular value farther
from 1 than Jordan's five fp32 steps do, on random, ill-conditioned and real gradient stacks; the Gram iteration
computes the plain one's polynomials; batching matrices of one shape across parameters changes no matrix's result;
the bf16 iteration reaches the fp32 one's band, and `auto` takes it exactly where the CPU has AMX; and a momentum
buffer handed in as the update (Muon without Nesterov), fp32 or bf16, is never written to."""

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_MOE

from moelab.model import Transformer
from moelab.run_config import load_config
from moelab.train.muon import MuonAdamW, scale
from moelab.train.polar import _gram, _plain, coefficients, fast_dtype, orthogonalise


def ill_conditioned(n, a, b, decades=3.0, seed=0):
    """n matrices a x b whose singular values fall from 1 to 10^-decades: what late-training gradients look like."""
    g = torch.Generator().manual_seed(seed)
    u, _, v = torch.linalg.svd(torch.randn(n, a, b, generator=g), full_matrices=False)
    s = torch.logspace(0, -decades, min(a, b))
    return u @ torch.diag_embed(s.expand(n, -1)) @ v


@pytest.fixture(scope="module")
def real_grads():
    """The Muon-shaped gradients of tiny-moe (expert stacks, attention) after one backward."""
    cfg = load_config("tiny-moe", TINY_MOE)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (4, 33))
    model(x[:, :-1], x[:, 1:]).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.ndim >= 2 and n.startswith("layers.")}


@pytest.fixture(scope="module")
def stacks(real_grads):
    """Random, ill-conditioned (square too) and real gradient stacks: what the orthogonalisation is judged on."""
    return {
        "gaussian": torch.randn(6, 32, 64, generator=torch.Generator().manual_seed(1)),
        "ill-conditioned": ill_conditioned(6, 32, 64),
        "square, ill-conditioned": ill_conditioned(4, 48, 48, decades=2),
        **real_grads,
    }


def band(t):
    s = torch.linalg.svdvals(t.double())
    return float(s.min()), float(s.max())


def test_polar_express_is_at_least_as_orthogonal_as_jordans_five_steps(stacks):
    for name, g in stacks.items():
        (pe,), (jordan,) = orthogonalise([g], 5, "polar_express"), orthogonalise([g], 5, "jordan")
        (lo_pe, hi_pe), (lo_j, hi_j) = band(pe), band(jordan)
        # the worst singular value is no farther from 1 than Jordan's worst
        assert max(1 - lo_pe, hi_pe - 1) <= max(1 - lo_j, hi_j - 1) + 1e-3, (name, (lo_pe, hi_pe), (lo_j, hi_j))
        assert hi_pe < 1.13, name  # the paper's quintics end at ~1.12; a wrong table overshoots (4 steps: ~1.56)
    lo, hi = band(orthogonalise([ill_conditioned(6, 32, 64, decades=1)], 5, "polar_express")[0])
    assert 0.85 < lo and hi < 1.13  # every direction within 1e-1 of the largest ends up near 1


@pytest.mark.parametrize("aspect", [2, 4])
def test_the_gram_iteration_computes_the_plain_ones_polynomials(aspect):
    x = ill_conditioned(5, 24, 24 * aspect, decades=2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01)
    coeffs = coefficients("polar_express", 5)
    ref = x.double()
    for a, b, c in coeffs:  # float64, plain, the definition
        r = ref @ ref.mT
        ref = a * ref + (b * r + c * r @ r) @ ref
    for got in (_gram(x, coeffs), _plain(x, coeffs)):
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=0)


def test_batching_across_parameters_changes_no_matrix(real_grads):
    grads = list(real_grads.values())
    together = orthogonalise(grads, 5)
    assert len({tuple(sorted(g.shape[-2:])) for g in grads}) < len(grads)  # some shapes are shared, so batched
    for g, t in zip(grads, together, strict=True):
        assert t.shape == g.shape
        torch.testing.assert_close(t, orthogonalise([g], 5)[0], atol=1e-6, rtol=0)
        if g.ndim == 3:  # and an expert stack is its experts, one by one
            for e in range(g.size(0)):
                torch.testing.assert_close(t[e], orthogonalise([g[e]], 5)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (3, 8, 20)])
def test_the_momentum_buffer_is_not_written_by_the_orthogonalisation(dtype, nesterov, shape):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grad = p.grad.clone()
    opt = MuonAdamW([{"params": [p], "algo": "muon", "weight_decay": 0.0, "nesterov": nesterov}], lr=0.0)
    opt.step()
    expected = torch.zeros_like(grad).lerp_(grad, 1 - 0.95)
    assert torch.equal(opt.state[p]["momentum_buffer"], expected)
    assert torch.equal(p.grad, grad) and torch.equal(p.detach(), torch.zeros_like(p))


def test_the_bf16_iteration_reaches_the_fp32_ones_band(stacks):
    for name, g in stacks.items():
        (f32,), (b16,) = orthogonalise([g], 5), orthogonalise([g], 5, dtype=torch.bfloat16)
        assert b16.dtype == torch.float32 and b16.shape == g.shape
        (lo, hi), (lo16, hi16) = band(f32), band(b16)
        assert lo16 > lo - 0.05 and hi16 < hi + 0.05, (name, (lo, hi), (lo16, hi16))  # bf16 keeps ~3 digits
        if "router" not in name:  # (a router's gradient lacks a direction, which bf16's rounding then supplies; the
            # router takes AdamW unless optim.muon_router)
            assert torch.nn.functional.cosine_similarity(f32.flatten(), b16.flatten(), dim=0) > 0.99, name


def test_auto_iterates_in_bf16_exactly_where_the_cpu_multiplies_it_natively():
    amx = re.search(r"\bamx_bf16\b", Path("/proc/cpuinfo").read_text()) is not None  # the kernel's word, not torch's
    cpu = torch.device("cpu")
    assert fast_dtype("auto", cpu) == (torch.bfloat16 if amx else torch.float32)
    assert (fast_dtype("fp32", cpu), fast_dtype("bf16", cpu)) == (torch.float32, torch.bfloat16)
    assert load_config("tiny-moe").optim.ns_dtype == "fp32"  # bf16's quality over seeds is not measured yet


def test_the_step_iterates_in_its_groups_dtype_and_a_group_saved_before_the_setting_in_fp32():
    g = torch.randn(3, 8, 20, generator=torch.Generator().manual_seed(2))

    def step(setting):
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        opt = MuonAdamW([{"params": [p], "algo": "muon", "weight_decay": 0.0}], lr=1.0, ns_dtype=setting or "bf16")
        if setting is None:  # as a checkpoint written before optim.ns_dtype loads its param groups
            del opt.param_groups[0]["ns_dtype"]
        opt.step()
        return -p.detach() / scale(g.shape)

    nesterov = g.lerp(torch.zeros_like(g).lerp(g, 0.05), 0.95)  # the update Muon orthogonalises
    for setting, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), (None, torch.float32)):
        torch.testing.assert_close(step(setting), orthogonalise([nesterov], 5, dtype=dtype)[0], atol=1e-6, rtol=0)
    assert (step("bf16") - step("fp32")).abs().max() > 1e-4  # the two iterations do differ: the test can tell
