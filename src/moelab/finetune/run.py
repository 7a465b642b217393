"""`moelab finetune`: start from a checkpoint, train on SFT examples with a recipe."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data import Data
from ..data.chat import copy_tokenizer_extras, load_chat_format
from ..data.sft import SFTExamples, load_sft
from ..data.tokenizer import token_byte_lengths
from ..errors import CheckpointError
from ..run_config import RunConfig, apply_overrides, config_from_dict
from ..store.run import load_run, load_tokenizer
from ..train import train
from .recipes import apply_recipe, trainable_report


def finetune_data(cfg: RunConfig, data_src: str, tok, run_dir: Path | None = None, *, verbose: bool = True) -> Data:
    """Training and held-out examples as `cfg` selects them (chat format of `run_dir`,
    split, seeded subset, seq_len)."""
    fmt = load_chat_format(run_dir, cfg.finetune.chat_template)
    if verbose:
        print(f"chat format (for messages examples): {fmt.describe()}", file=sys.stderr)
    train_ex, val_ex = load_sft(data_src, cfg.data.val_fraction, fmt)
    n = cfg.finetune.train_examples
    if n is not None:
        if n > len(train_ex):
            raise ConfigError(
                f"finetune.train_examples: {n} exceeds the {len(train_ex)} training examples of '{data_src}'"
            )
        keep = np.random.default_rng(cfg.train.seed).permutation(len(train_ex))[:n]
        train_ex = [train_ex[i] for i in sorted(keep)]
    train = SFTExamples(train_ex, tok, cfg.data.seq_len, fmt.eos_token)
    val = SFTExamples(val_ex, tok, cfg.data.seq_len, fmt.eos_token)
    data = Data(tok, train, val, token_byte_lengths(tok))
    for name, part in (("training", train), ("held-out", val)):
        if part.dropped and verbose:
            print(
                f"warning: {part.dropped} {name} examples have no completion token within "
                f"data.seq_len={cfg.data.seq_len} and were skipped",
                file=sys.stderr,
            )
    return data


def finetune(
    run: str,
    data_src: str,
    out: str | Path,
    recipe: str,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    quiet: bool = False,
):
    """Fine-tune the run or checkpoint `run` on SFT `data_src` into `out` with `recipe` (and overrides); writes
    finetune.json beside the run and returns the TrainResult."""
    base = load_run(run, device="cpu")
    tok_file = base.checkpoint.parent.parent / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file} is missing: fine-tuning needs the base model's tokenizer")
    d = base.cfg.to_dict()
    d["finetune"] = {**d.get("finetune", {}), "recipe": recipe}
    d = apply_overrides(d, list(overrides))
    d["name"] = f"{d.get('name', 'run')}-{recipe}"
    cfg = config_from_dict(d)
    if steps is not None:
        cfg.train.steps = steps
    ft = cfg.finetune
    if cfg.model.moe is not None:
        cfg.model.moe.expert_dropout = ft.expert_dropout
        if not ft.aux_loss:
            cfg.model.moe.lb_coef = cfg.model.moe.z_coef = 0.0
    elif ft.expert_dropout:
        print("warning: finetune.expert_dropout has no effect on a dense model", file=sys.stderr)
    cfg.data.source = data_src
    cfg.validate()

    base_dir = tok_file.parent
    data = finetune_data(cfg, data_src, load_tokenizer(tok_file), base_dir)
    out = Path(out)
    report: dict = {}

    def prepare(model):
        apply_recipe(model, recipe, cfg.lora)
        report.update(trainable_report(model))
        moe = cfg.model.moe
        aux = (
            f"aux loss ON (lb_coef={moe.lb_coef}, z_coef={moe.z_coef})"
            if moe and ft.aux_loss
            else "aux loss OFF"
            if moe
            else "dense model (no aux loss)"
        )
        lines = [
            f"fine-tuning recipe '{recipe}': {report['trainable']:,} of {report['total']:,} parameters "
            f"trainable; {aux}; expert dropout {ft.expert_dropout}"
        ]
        lines += [f"  {g:<15} {v['trainable']:>12,} / {v['total']:,}" for g, v in report["groups"].items()]
        print("\n".join(lines), file=sys.stderr)

    res = train(cfg, out, overwrite=overwrite, init=str(base.checkpoint), quiet=quiet, data=data, prepare_model=prepare)
    copy_tokenizer_extras(base_dir, out)  # the chat template and special tokens travel with the weights
    (out / "finetune.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "base": str(base.checkpoint),
                "data": data_src,
                "train_examples": len(data.train),
                "heldout_examples": len(data.val),
                **report,
            },
            indent=1,
        )
    )
    return res
