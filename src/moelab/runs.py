"""Loading what a run wrote, in one place for every command that reads runs (eval,
generate, export, finetune, upcycle, compress, the trainer's own resume): the run folder
and its latest good checkpoint (either form: single-process safetensors or a
multi-process DCP folder, consolidated in memory), weights checked key by key, the
device, and the validation loss the trainer logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .data.tokenizer import load_tokenizer
from .errors import CheckpointError
from .model import Transformer
from .run_config import RunConfig, read_config
from .runtime import pick_device

__all__ = ["LoadedRun", "load_run", "load_model_weights", "evaluate", "pick_device"]


@dataclass
class LoadedRun:
    """A loaded run: its config, model (on the chosen device, in eval mode), tokenizer (None for imports without one)
    and the checkpoint used."""

    cfg: RunConfig
    model: Transformer
    tokenizer: Tokenizer | None  # None for imports that came without tokenizer.json
    checkpoint: Path

    def need_tokenizer(self) -> Tokenizer:
        """The tokenizer; CheckpointError when the run folder has none."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.checkpoint.parent.parent}/tokenizer.json is missing: this needs text")
        return self.tokenizer


def load_run(run_or_ckpt: str | Path, device: str = "auto") -> LoadedRun:
    """Load a run folder (its latest good checkpoint) or a checkpoint folder with its run's config and tokenizer; LoRA
    runs are merged. Raises CheckpointError naming what is missing or damaged."""
    from .train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(run_or_ckpt)
    run_dir = ckpt.parent.parent
    cfg_file, tok_file = run_dir / "config.yaml", run_dir / "tokenizer.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint is read with its run folder's config.yaml")
    cfg = read_config(cfg_file)
    model = Transformer(cfg.model)
    if cfg.quant.bits:  # packed weights: rebuild the same parametrizations, then load them
        from .compress.quantize import quantize_model

        quantize_model(model, cfg.quant.bits, cfg.quant.group_size, cfg.quant.what)
    if cfg.finetune.recipe == "lora":  # adapters are saved unmerged: rebuild, load, then fold in
        from .finetune.lora import apply_lora, merge_lora

        apply_lora(model, cfg.lora.target_list(), cfg.lora.rank, cfg.lora.alpha)
        load_model_weights(model, ckpt)
        merge_lora(model)
    else:
        load_model_weights(model, ckpt)
    model.to(pick_device(device)).eval()
    return LoadedRun(cfg, model, load_tokenizer(tok_file) if tok_file.is_file() else None, ckpt)


def unpack_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, padding mask or None): packed text has no padding, SFT rows do."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


@torch.no_grad()
def evaluate(model: Transformer, data_val, batch_size: int, n_batches: int, device, ctx, par=None) -> float:
    """Mean next-token loss (nats) over a fixed subset of batch_size x n_batches validation
    sequences spread evenly over the whole split: a prefix would be the first few held-out
    documents only, and rank runs by how they do on those. With `par` (a multi-process
    run) the ranks split each batch and add up their sums: every rank runs the same
    number of forwards (expert parallelism exchanges tokens in each), one with no share
    runs a dummy row that is not counted."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(data_val), batch_size * n_batches)
    chosen = np.unique(np.linspace(0, len(data_val) - 1, n).round().astype(np.int64))
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start : start + batch_size]
        if par is not None:
            idx = np.array_split(idx, par.world)[par.rank]
        weight = 1.0 if len(idx) else 0.0
        x, y, mask = unpack_batch(data_val.batch((idx if len(idx) else chosen[:1]).tolist()))
        with ctx:
            out = model(x.to(device), y.to(device), mask.to(device) if mask is not None else None)
        n_targets = int((y != -100).sum()) * weight
        total += float(out.lm_loss) * n_targets
        count += int(n_targets)
    if par is not None:
        from .parallel.parallelize import all_reduce_floats

        total, count_f = all_reduce_floats([total, float(count)], par, op="sum")
        count = int(count_f)
    model.train(was)
    return total / max(count, 1)


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights (either form) into `model`: every key present, every
    shape equal and every value finite, else CheckpointError naming the keys."""
    from .train.checkpoint import model_tensors

    tensors = model_tensors(ckpt)
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shapes = [
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in state.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model (shapes differ): {'; '.join(shapes[:4])}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {ckpt} holds non-finite values (NaN/inf) in {bad[:5]}")
    model.load_state_dict(tensors)
