"""Dense -> MoE sparse upcycling (Komatsuzaki et al. 2023; the MM1 recipe).

Every chosen dense SwiGLU becomes E experts that start as copies of it, behind a new
router. With `granularity` G each FFN is first cut into G slices of its hidden units,
giving E*G fine-grained experts and top-k*G routing; the slices' down projections are
scaled by G so that, with uniform routing and renormalised top-k weights, the MoE
computes exactly the dense FFN at step 0.

Expert e*G + g holds slice g of copy e. With a zero router every probability ties, and
top-k picks a run of consecutive experts (torch.topk does; the tests check it), which
holds every slice equally often - so the sum is exact.

Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): `drop_ratio` r re-initialises,
in each expert independently, a random r share of its hidden units - their rows of
w_gate and w_up and their column of w_down - from a normal with the mean and standard
deviation of the dense weight it copied, so the copies start apart and specialise
sooner while keeping (1 - r) of the dense knowledge.

Router init: "zeros" (uniform; exact equality at step 0), "normal" (small random,
Switch scale), or "hidden" (row e = the mean normalised hidden state that prompt e
produces at that layer's FFN input, as mergekit-moe does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, MoEConfig
from ..model import Transformer
from ..model.blocks import SwiGLU
from ..run_config import RunConfig
from ..store.outputs import check_output, staged_output
from ..store.run import load_run, load_tokenizer
from .io import read_hf, write_model_folder


def upcycled_config(
    cfg: ModelConfig,
    experts: int,
    top_k: int,
    granularity: int = 1,
    pattern: str = "all",
    first_dense: int = 0,
    **moe_kw,
) -> ModelConfig:
    """The ModelConfig of `cfg` upcycled: every FFN chosen by `pattern`/`first_dense` becomes `experts` x `granularity`
    experts of width d_ff / granularity with top-(top_k x granularity) renormalised routing. ConfigError when the
    source is already an MoE or the sizes do not divide."""
    if cfg.moe is not None and cfg.n_moe_layers:
        raise ConfigError("upcycle: the source is already an MoE model")
    if cfg.d_ff % granularity:
        raise ConfigError(f"--granularity {granularity} does not divide the FFN hidden size {cfg.d_ff}")
    if top_k > experts:
        raise ConfigError(f"--top-k {top_k} exceeds --experts {experts}")
    moe = MoEConfig(
        d_model=cfg.d_model,
        d_expert=cfg.d_ff // granularity,
        n_experts=experts * granularity,
        top_k=top_k * granularity,
        renormalize=True,
        **moe_kw,
    )
    return ModelConfig(**{**cfg.__dict__, "moe": moe, "moe_pattern": pattern, "first_dense": first_dense})


@torch.no_grad()
def _ffn_inputs(dense: Transformer, prompts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per layer, per prompt: the mean RMS-normalised FFN input over the prompt's tokens."""
    captured: list[list[torch.Tensor]] = [[] for _ in dense.layers]
    hooks = [
        layer.ffn_norm.register_forward_hook(lambda mod, inp, out, i=i: captured[i].append(out[0].mean(0)))
        for i, layer in enumerate(dense.layers)
    ]
    try:
        dense.eval()
        for ids in prompts:
            dense(ids.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def upcycle(
    dense: Transformer,
    experts: int,
    top_k: int,
    *,
    granularity: int = 1,
    router_init: str = "zeros",
    noise: float = 0.0,
    pattern: str = "all",
    first_dense: int = 0,
    prompts: list[torch.Tensor] | None = None,
    seed: int = 0,
    drop_ratio: float = 0.0,
    **moe_kw,
) -> Transformer:
    """A new MoE Transformer whose experts start as copies (or slices) of `dense`'s FFNs and whose router starts by
    `router_init` (zeros, normal, hidden with one prompt per expert), with optional multiplicative noise. With a zero
    router, no noise and no drop it computes exactly `dense`."""
    if not 0.0 <= drop_ratio <= 1.0:
        raise ConfigError(f"--drop-ratio: expected a share of hidden units in 0..1, got {drop_ratio!r}")
    if router_init not in ("zeros", "normal", "hidden"):
        raise ConfigError(f"--router-init: expected zeros, normal or hidden, got {router_init!r}")
    cfg = upcycled_config(dense.cfg, experts, top_k, granularity, pattern, first_dense, **moe_kw)
    moe_cfg = cfg.moe
    assert moe_cfg is not None
    moe_model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    state = moe_model.state_dict()
    for k, v in dense_state.items():
        if ".ffn." not in k:
            state[k].copy_(v)
    hidden = None
    if router_init == "hidden":
        if not prompts or len(prompts) != experts:
            raise ConfigError(f"--router-init hidden needs one prompt per expert ({experts}), got {len(prompts or [])}")
        hidden = _ffn_inputs(dense, prompts)
    G, F = granularity, dense.cfg.d_ff // granularity
    for i, layer in enumerate(moe_model.layers):
        src = dense.layers[i].ffn
        assert isinstance(src, SwiGLU)  # upcycled_config refused an MoE source
        if not layer.is_moe:
            for name in ("w_gate", "w_up", "w_down"):
                state[f"layers.{i}.ffn.{name}"].copy_(getattr(src, name))
            continue
        ex = f"layers.{i}.ffn.experts."
        for e in range(experts):
            for s in range(G):
                j = e * G + s
                rows = slice(s * F, (s + 1) * F)
                state[ex + "w_gate"][j].copy_(src.w_gate[rows])
                state[ex + "w_up"][j].copy_(src.w_up[rows])
                state[ex + "w_down"][j].copy_(src.w_down[:, rows] * G)
        if drop_ratio > 0:
            _drop(state, ex, src, round(drop_ratio * F), experts * G, g)
        if noise > 0:  # multiplicative noise breaks the copies' symmetry (and exact equality)
            for name in ("w_gate", "w_up", "w_down"):
                w = state[ex + name]
                w.mul_(1 + noise * torch.randn(w.shape, generator=g))
        router = state[f"layers.{i}.ffn.router.weight"]
        if router_init == "zeros":
            router.zero_()
        elif router_init == "normal":
            router.copy_(torch.randn(router.shape, generator=g) * moe_cfg.init_std_router)
        else:
            assert hidden is not None
            rows_ED = torch.stack([h / h.norm().clamp_min(1e-6) for h in hidden[i]])
            router.copy_(rows_ED.repeat_interleave(G, dim=0))
    moe_model.load_state_dict(state)
    return moe_model


def _drop(state: dict, ex: str, src: SwiGLU, n_drop: int, n_experts: int, g: torch.Generator) -> None:
    """Drop-Upcycling: per expert, `n_drop` random hidden units re-drawn from N(mean, std) of the dense weight."""
    if n_drop == 0:
        return
    stats = {name: (float(w.mean()), float(w.std())) for name, w in (("w_gate", src.w_gate), ("w_up", src.w_up),
                                                                     ("w_down", src.w_down))}  # fmt: skip
    F = state[ex + "w_gate"].shape[1]
    for j in range(n_experts):
        idx = torch.randperm(F, generator=g)[:n_drop]
        for name in ("w_gate", "w_up"):  # rows (F, D)
            mean, std = stats[name]
            w = state[ex + name][j]
            w[idx] = mean + std * torch.randn((n_drop, w.shape[1]), generator=g)
        mean, std = stats["w_down"]
        w = state[ex + "w_down"][j]  # (D, F): the units' columns
        w[:, idx] = mean + std * torch.randn((w.shape[0], n_drop), generator=g)


def upcycle_to_folder(
    src: str, out, experts: int, top_k: int, *, prompts_file: str | None = None, overwrite: bool = False, **kw
):
    """Upcycle an HF folder or moelab run into a run folder (step 0) that carries the
    dense run's hyper-parameters. `prompts_file`: one prompt per expert, for router_init
    "hidden". `out` must be new or empty unless `overwrite`. Returns (folder, model)."""

    check_output(out, overwrite=overwrite, protect=[src, prompts_file], kind="run")
    src_path = Path(src)
    if (src_path / "config.json").is_file():
        dense, _ = read_hf(src_path)
        run_cfg, tok_file = RunConfig(name=src_path.name, model=dense.cfg), src_path / "tokenizer.json"
        run_cfg.data.seq_len = min(run_cfg.data.seq_len, dense.cfg.max_seq_len)
    else:
        r = load_run(src, device="cpu")
        dense, run_cfg, tok_file = r.model, r.cfg, r.checkpoint.parent.parent / "tokenizer.json"
    prompts = None
    if prompts_file:
        if not tok_file.is_file():
            raise ConfigError(f"--prompts needs the source's tokenizer.json ({tok_file} is missing)")
        tok = load_tokenizer(tok_file)
        if not Path(prompts_file).is_file():
            raise ConfigError(f"--prompts: {prompts_file} is not a file (expected one prompt per line)")
        lines = [ln for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        prompts = [torch.tensor(tok.encode(ln).ids[: dense.cfg.max_seq_len] or [0]) for ln in lines]
    moe = upcycle(dense, experts, top_k, prompts=prompts, **kw)
    with staged_output(out, overwrite=overwrite, protect=[src, prompts_file], kind="run") as tmp:
        write_model_folder(tmp, carry_over(run_cfg, moe.cfg), moe, tok_file, {"upcycled_from": str(src)})
    return Path(out), moe


def carry_over(cfg_run, model_cfg: ModelConfig):
    """The dense run's hyper-parameters with the upcycled model (MM1 kept them)."""
    new = copy.deepcopy(cfg_run)
    new.model = model_cfg
    new.name = f"{cfg_run.name}-upcycled"
    return new
