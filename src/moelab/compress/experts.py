"""Fewer experts per MoE layer: prune or merge, scored on calibration text.

Scores per layer, from the model's own routing on the calibration tokens (T tokens, K
assignments each):
- frequency f_e: the share of the T*K assignments expert e received;
- REAP score: the mean over e's assignments of (routing weight x L2 norm of e's output),
  the router-weighted activation of "REAP" (2025), which ranks experts by what they add
  to the layer's output rather than by how often they are picked;
- output signature: e's mean output over *all* calibration tokens (every expert applied
  to every token), what HC-SMoE clusters on.

`prune` keeps the E2 experts with the highest REAP scores and their router rows.
`merge` groups the experts into E2 groups and replaces each group by the average of its
weights weighted by frequency (an expert no token chose counts a little, not zero), and
its router row by the same average: method "frequency" (MC-SMoE style) makes the E2 most
used experts the group centres and joins every other expert to the centre whose router
row is most similar (cosine); "output-cluster" (HC-SMoE style) joins groups
agglomeratively, average linkage on the cosine distance of the output signatures, until
E2 remain. top_k is clamped to E2. The result is an ordinary checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..convert.io import write_model_folder
from ..data import dataset_for
from ..data.chat import copy_tokenizer_extras
from ..errors import ConfigError
from ..model import Transformer
from ..moe import MoE
from ..store.outputs import check_output, staged_output
from ..store.run import load_run


@dataclass
class ExpertScores:
    """Per MoE layer, per expert: frequency (E,), REAP score (E,), output signature (E, D)."""

    frequency: torch.Tensor
    reap: torch.Tensor
    signature: torch.Tensor


def _expert_outputs(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert applied to every token: (E, T, D)."""
    ex = moe.experts
    h = F.silu(torch.einsum("td,efd->etf", x_TD, ex.w_gate)) * torch.einsum("td,efd->etf", x_TD, ex.w_up)
    return torch.einsum("etf,edf->etd", h, ex.w_down)


@torch.no_grad()
def score_experts(model: Transformer, tokens_BS: torch.Tensor, batch_size: int = 8) -> list[ExpertScores]:
    """Scores of every MoE layer (in layer order) over the calibration token batch (B, S)."""
    moes = model.moe_layers()
    inputs: list[list[torch.Tensor]] = [[] for _ in moes]
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, m in enumerate(moes)
    ]
    try:
        model.eval()
        for start in range(0, len(tokens_BS), batch_size):
            model(tokens_BS[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    out = []
    for moe, xs in zip(moes, inputs, strict=True):
        x_TD = torch.cat(xs)
        r = moe.router(x_TD)
        E = moe.cfg.n_experts
        y_ETD = _expert_outputs(moe, x_TD)
        counts = torch.bincount(r.expert_idx_TK.reshape(-1), minlength=E).float()
        reap = torch.zeros(E)
        norms_ET = y_ETD.norm(dim=-1)
        for k in range(r.expert_idx_TK.shape[1]):
            e_T = r.expert_idx_TK[:, k]
            reap.index_add_(0, e_T, r.weights_TK[:, k] * norms_ET[e_T, torch.arange(len(e_T))])
        out.append(ExpertScores(counts / counts.sum(), reap / counts.clamp_min(1), y_ETD.mean(1)))
    return out


def _groups_frequency(moe: MoE, s: ExpertScores, n: int) -> list[list[int]]:
    centres = s.frequency.argsort(descending=True)[:n].tolist()
    rows = F.normalize(moe.router.weight, dim=-1)
    groups = [[c] for c in centres]
    for e in range(moe.cfg.n_experts):
        if e not in centres:
            groups[int((rows[centres] @ rows[e]).argmax())].append(e)
    return groups


def _groups_output_cluster(s: ExpertScores, n: int) -> list[list[int]]:
    sig = F.normalize(s.signature, dim=-1)
    dist = 1 - sig @ sig.T
    groups = [[e] for e in range(len(sig))]
    while len(groups) > n:
        best, pair = None, (0, 1)
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                d = float(dist[groups[i]][:, groups[j]].mean())
                if best is None or d < best:
                    best, pair = d, (i, j)
        i, j = pair
        groups[i] += groups.pop(j)
    return [sorted(g) for g in groups]


def _merged(w: torch.Tensor, groups: list[list[int]], coefs: list[torch.Tensor]) -> torch.Tensor:
    """Per group, the coefficient-weighted sum of the rows w[e] of its experts."""
    return torch.stack([torch.einsum("g,g...->...", c, w[g]) for g, c in zip(groups, coefs, strict=True)])


def _rebuild(model: Transformer, keep: list[list[list[int]]], freqs: list[torch.Tensor]) -> Transformer:
    """A model with E2 experts per MoE layer: group g of layer l is the frequency-weighted
    mean of experts keep[l][g] (a group of one is that expert, unchanged)."""
    n_new = len(keep[0])
    cfg = copy.deepcopy(model.cfg)
    assert cfg.moe is not None
    cfg.moe.n_experts, cfg.moe.top_k = n_new, min(cfg.moe.top_k, n_new)
    new = Transformer(cfg)
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k and ".router." not in k}
    moe_idx = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    for i, groups, f in zip(moe_idx, keep, freqs, strict=True):
        moe = model.layers[i].ffn
        assert isinstance(moe, MoE)
        p = f"layers.{i}.ffn."
        # frequency weights, with a floor so an expert no token chose still counts a little
        coefs = [(f[g] + 1e-3) / (f[g] + 1e-3).sum() for g in groups]

        for name in ("w_gate", "w_up", "w_down"):
            state[p + f"experts.{name}"] = _merged(getattr(moe.experts, name), groups, coefs)
        state[p + "router.weight"] = _merged(moe.router.weight, groups, coefs)
        if moe.router.bias is not None:
            state[p + "router.bias"] = _merged(moe.router.bias, groups, coefs)
    new.load_state_dict(state)
    return new


def reduce_experts(model: Transformer, tokens_BS: torch.Tensor, n_experts: int, method: str) -> Transformer:
    """`model` with `n_experts` per MoE layer, by `method`: prune (REAP), frequency or
    output-cluster merging. ConfigError when n_experts does not fit."""
    moes = model.moe_layers()
    if not moes or model.cfg.moe is None:
        raise ConfigError("this model has no MoE layers to prune or merge")
    if not 0 < n_experts < model.cfg.moe.n_experts:
        raise ConfigError(f"expected a number of experts in 1..{model.cfg.moe.n_experts - 1}, got {n_experts}")
    scores = score_experts(model, tokens_BS)
    if method == "prune":
        keep = [[[e] for e in sorted(s.reap.argsort(descending=True)[:n_experts].tolist())] for s in scores]
    elif method == "frequency":
        keep = [_groups_frequency(m, s, n_experts) for m, s in zip(moes, scores, strict=True)]
    elif method == "output-cluster":
        keep = [_groups_output_cluster(s, n_experts) for s in scores]
    else:
        raise ConfigError(f"--method: expected frequency or output-cluster, got {method!r}")
    return _rebuild(model, keep, [s.frequency for s in scores])


def reduce_checkpoint(
    src: str, out: str, *, n_experts: int, calib: str, method: str, max_tokens: int = 32768, overwrite: bool = False
) -> tuple[Path, Transformer]:
    """Prune or merge the experts of run `src` on calibration source `calib` into a run folder `out`."""

    check_output(out, overwrite=overwrite, protect=[src, calib], kind="run")
    r = load_run(src, device="cpu")
    if r.cfg.quant.bits:
        raise ConfigError(f"{src} is quantized; prune or merge the original run, then quantize")
    S = r.cfg.data.seq_len
    ds = dataset_for(calib, r.need_tokenizer(), text_field=r.cfg.data.text_field, val_fraction=r.cfg.data.val_fraction)
    stream = ds.stream("train", "val")
    n = min(len(stream) // S, max(1, max_tokens // S))
    tokens = torch.from_numpy(np.asarray(stream[0 : n * S], dtype=np.int64).reshape(n, S))
    new = reduce_experts(r.model, tokens, n_experts, method)
    cfg = copy.deepcopy(r.cfg)
    cfg.model = new.cfg
    cfg.name = f"{r.cfg.name}-{method}{n_experts}"
    run_dir = r.checkpoint.parent.parent
    with staged_output(out, overwrite=overwrite, protect=[run_dir, calib], kind="run") as tmp:
        write_model_folder(tmp, cfg, new, run_dir / "tokenizer.json", {f"{method}_from": str(r.checkpoint)})
        copy_tokenizer_extras(run_dir, tmp)
    return Path(out), new
