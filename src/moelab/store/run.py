"""Loading what a run wrote, in one place for every command that reads runs (eval,
generate, export, finetune, upcycle, compress, the trainer's own resume): the run folder
and its latest good checkpoint (either form: single-process safetensors or a
multi-process DCP folder, consolidated in memory), its config and tokenizer, weights
checked key by key, and the model structure a stored run needs (quantized weights, LoRA
adapters) rebuilt before its weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from ..model.lora import apply_lora, merge_lora
from ..model.quant import quantize_model
from ..run_config import RunConfig, read_config
from ..runtime import check_fits, pick_device
from .checkpoint import model_tensors, resolve_checkpoint

__all__ = ["LoadedRun", "load_run", "load_model_weights", "load_tokenizer"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; ConfigError naming the file when it is missing or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer file '{path}' does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise ConfigError(f"{path}: not a valid tokenizer.json ({e})") from None


@dataclass
class LoadedRun:
    """A loaded run: its config, model (on the chosen device, in eval mode), tokenizer (None for imports without one)
    and the checkpoint used."""

    cfg: RunConfig
    model: Transformer
    tokenizer: Tokenizer | None  # None for imports that came without tokenizer.json
    checkpoint: Path

    @property
    def tokenizer_file(self) -> Path | None:
        """The run folder's tokenizer.json, None when it has none."""
        path = self.checkpoint.parent.parent / "tokenizer.json"
        return path if path.is_file() else None

    def need_tokenizer(self) -> Tokenizer:
        """The tokenizer; CheckpointError when the run folder has none."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.checkpoint.parent.parent}/tokenizer.json is missing: this needs text")
        return self.tokenizer


def read_run_config(run_or_ckpt: str | Path) -> tuple[Path, RunConfig]:
    """(the checkpoint to read, the config of its run) for a run folder (its latest good
    checkpoint) or a checkpoint folder, no weights loaded; CheckpointError naming what is missing."""
    ckpt = resolve_checkpoint(run_or_ckpt)
    cfg_file = ckpt.parent.parent / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint is read with its run folder's config.yaml")
    return ckpt, read_config(cfg_file)


def load_run(run_or_ckpt: str | Path, device: str = "auto") -> LoadedRun:
    """Load a run folder (its latest good checkpoint) or a checkpoint folder with its run's config and tokenizer; LoRA
    runs are merged. Raises CheckpointError naming what is missing or damaged."""
    ckpt, cfg = read_run_config(run_or_ckpt)
    tok_file = ckpt.parent.parent / "tokenizer.json"
    check_fits(cfg.model.param_counts()["total"], 4, pick_device(device), "its fp32 weights")
    model = Transformer(cfg.model)
    if cfg.quant.bits:  # packed weights: rebuild the same parametrizations, then load them
        quantize_model(model, cfg.quant.bits, cfg.quant.group_size, cfg.quant.what)
    if cfg.finetune.recipe == "lora":  # adapters are saved unmerged: rebuild, load, then fold in
        apply_lora(model, cfg.lora.target_list(), cfg.lora.rank, cfg.lora.alpha)
        load_model_weights(model, ckpt)
        merge_lora(model)
    else:
        load_model_weights(model, ckpt)
    model.to(pick_device(device)).eval()
    return LoadedRun(cfg, model, load_tokenizer(tok_file) if tok_file.is_file() else None, ckpt)


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights (either form) into `model`: every key present, every
    shape equal and every value finite, else CheckpointError naming the keys."""
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
