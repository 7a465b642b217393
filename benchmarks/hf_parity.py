"""Training-dynamics parity with Hugging Face transformers.

moelab's own trainer trains a recipe for a few steps; the same initial weights, exported
with `moelab export`, are trained in `transformers` (LlamaForCausalLM or
MixtralForCausalLM) by a plain loop written here from the published recipe, with its own
sequence windows, batch order and learning-rate schedule (so that a bug in moelab's
loader, sampler or `lr_at` shows instead of cancelling out): the same batches in the
same order, AdamW with the same parameter groups (no weight decay on
embeddings and 1-D gains), the same warmup/cosine schedule, global-norm clipping, and the
same auxiliary losses computed from the Hugging Face model's own router logits (its
`load_balancing_loss_func` per layer, divided by top-k because it counts assignments per
token; the ST-MoE z-loss). If the two loss curves agree to float noise, moelab's forward,
backward, losses and update are those of the reference implementation, and any quality
gap is a matter of settings, not of a bug.

Hugging Face's own `router_aux_loss_coef` path pools all layers' routing into one
balance loss; moelab balances each layer and averages. The loop here follows moelab's
definition so that the comparison isolates the implementation (docs/quality.md discusses
the definitions).

Run from the command line (docs/quality.md), and imported by
tests/analysis/test_hf_training_parity.py:

    python benchmarks/hf_parity.py --recipe tiny-moe --steps 20 --data stdlib
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moelab.convert.io import export_hf
from moelab.data import dataset_for
from moelab.model import Transformer
from moelab.run_config import RunConfig, load_config
from moelab.store.run import load_tokenizer
from moelab.train import train


def _hf_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """moelab's rule on Hugging Face names: decay matrices, not embeddings or gains."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _hf_loss(hf, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, LM loss) of a Hugging Face causal LM with moelab's aux-loss definition."""
    moe = cfg.model.moe
    out = hf(input_ids=x, output_router_logits=moe is not None)
    lm = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    if moe is None:
        return lm, lm
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    aux = []
    for logits_TE in out.router_logits:
        lb = load_balancing_loss_func((logits_TE,), moe.n_experts, moe.top_k) / moe.top_k
        z = torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
        aux.append(moe.lb_coef * lb + moe.z_coef * z)
    return lm + torch.stack(aux).mean(), lm


def _reference_lr_factor(step: int, total: int, cfg: RunConfig) -> float:
    """The schedule as `OptimConfig` documents it, written here apart from moelab's
    `lr_at`: linear warmup reaching the peak at step `warmup_steps` (1-based), then a
    half cosine from the peak down to min_lr_ratio x peak at the last step."""
    o = cfg.optim
    if o.schedule != "cosine":
        raise ValueError(f"parity is defined for the cosine schedule, not {o.schedule!r}")
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    done = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 + math.cos(math.pi * done)) / 2


def _reference_batches(tokens: np.ndarray, S: int, B: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of the training tokens, written here apart from moelab's
    loader and sampler from their stated rule: sequence i is tokens[i*S : i*S + S + 1];
    epoch e visits every sequence once, in the order of numpy's default_rng([seed, e])
    permutation; a batch may run on into the next epoch."""
    n = (len(tokens) - 1) // S
    order = itertools.chain.from_iterable(np.random.default_rng([seed, e]).permutation(n) for e in itertools.count())
    while True:
        rows = torch.from_numpy(np.stack([tokens[i * S : i * S + S + 1] for i in itertools.islice(order, B)]))
        yield rows[:, :-1], rows[:, 1:]


def training_parity(cfg: RunConfig, steps: int, workdir: str | Path | None = None) -> dict:
    """Train `cfg` for `steps` in moelab and in transformers from the same initial weights;
    returns {"moelab": [loss per step], "transformers": [...], "lm_moelab", "lm_transformers",
    "max_abs_diff", "arch"}. Needs `transformers`; fp32 on CPU."""
    import transformers

    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.ckpt_every = steps, 1, steps, steps
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    if cfg.model.moe is not None and cfg.model.moe.jitter:
        raise ValueError("parity needs deterministic routing: set model.moe.jitter=0")
    if cfg.optim.name != "adamw":  # the reference loop below is torch's AdamW
        raise ValueError(f"parity trains AdamW on both sides: set optim.name=adamw (got {cfg.optim.name!r})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        init: dict = {}
        train(
            cfg,
            work / "moelab",
            quiet=True,
            overwrite=True,
            prepare_model=lambda m: init.update({k: v.detach().clone() for k, v in m.state_dict().items()}),
        )
        recs = [json.loads(line) for line in (work / "moelab" / "metrics.jsonl").read_text().splitlines()]
        ours, ours_lm = [r["loss"] for r in recs], [r["lm_loss"] for r in recs]

        start = Transformer(cfg.model)
        start.load_state_dict(init)
        export_hf(start, work / "hf", work / "moelab" / "tokenizer.json")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            work / "hf", attn_implementation="sdpa", dtype=torch.float32
        )
        arch = hf.config.model_type
        hf.train()
        o = cfg.optim
        opt = torch.optim.AdamW(_hf_param_groups(hf, o.weight_decay), lr=o.peak_lr, betas=(o.beta1, o.beta2), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _reference_lr_factor(step, steps, cfg))
        # the training split's tokens (the input both sides share); windows and order made here
        tok = load_tokenizer(work / "moelab" / "tokenizer.json")
        ds = dataset_for(cfg.data.source, tok, text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction)
        tokens = np.asarray(ds.split("train")[:], dtype=np.int64)
        batches = _reference_batches(tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
        theirs, theirs_lm = [], []
        clip = o.grad_clip if o.grad_clip > 0 else math.inf
        for _ in range(steps):
            loss_sum = lm_sum = 0.0
            for _ in range(cfg.train.grad_accum):
                x, y = next(batches)
                loss, lm = _hf_loss(hf, x, y, cfg)
                (loss / cfg.train.grad_accum).backward()
                loss_sum += loss.item() / cfg.train.grad_accum
                lm_sum += lm.item() / cfg.train.grad_accum
            torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            theirs.append(loss_sum)
            theirs_lm.append(lm_sum)
    diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    return {
        "arch": arch,
        "moelab": ours,
        "transformers": theirs,
        "lm_moelab": ours_lm,
        "lm_transformers": theirs_lm,
        "max_abs_diff": diff,
    }


def main() -> None:
    """Print the two loss curves side by side for a recipe."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.recipe, ["optim.name=adamw", *a.overrides])  # the transformers loop it is checked against
    cfg.data.source = a.data
    r = training_parity(cfg, a.steps)
    print(f"{a.recipe} vs transformers {r['arch']}: {a.steps} steps, max |loss difference| {r['max_abs_diff']:.2e}")
    print("| step | moelab loss | transformers loss | difference |\n|---:|---:|---:|---:|")
    for i, (x, y) in enumerate(zip(r["moelab"], r["transformers"], strict=True), 1):
        print(f"| {i} | {x:.6f} | {y:.6f} | {x - y:+.1e} |")


if __name__ == "__main__":
    main()
