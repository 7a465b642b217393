"""Loading trained runs, evaluating them on a source, and generating text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .data import dataset_for
from .data.loader import PackedSequences
from .data.tokenizer import load_tokenizer, token_byte_lengths
from .errors import NonFiniteError
from .model import Transformer
from .run_config import RunConfig, read_config
from .runtime import pick_device
from .train.checkpoint import CheckpointError, load_model_weights, resolve_checkpoint


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


@torch.no_grad()
def evaluate_source(
    run: LoadedRun, source: str, split: str = "val", max_tokens: int = 1_000_000, batch_size: int = 8
) -> dict:
    """loss (nats/token), perplexity, bits_per_byte and tokens on `source`.

    split="val" evaluates the documents the training split rule holds out; "all" every
    document (the training split's, then the validation split's). `source` may also be a
    dataset folder made with the run's tokenizer. Bits per byte = total nats / ln 2 /
    UTF-8 bytes of the predicted tokens.
    """
    tok = run.need_tokenizer()
    ds = dataset_for(source, tok, text_field=run.cfg.data.text_field, val_fraction=run.cfg.data.val_fraction)
    seqs = PackedSequences(
        ds.stream("val") if split == "val" else ds.stream("train", "val"), run.cfg.data.seq_len, source
    )
    nbytes = token_byte_lengths(tok)
    device = next(run.model.parameters()).device
    n = min(len(seqs), max(1, max_tokens // run.cfg.data.seq_len))
    nats, tokens, bytes_ = 0.0, 0, 0
    for start in range(0, n, batch_size):
        x, y = seqs.batch(np.arange(start, min(start + batch_size, n)))
        out = run.model(x.to(device), y.to(device))
        nats += float(out.lm_loss) * y.numel()
        tokens += y.numel()
        bytes_ += int(nbytes[y.numpy()].sum())
    loss = nats / tokens
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the loss of {run.checkpoint} on '{source}' is {loss}: the model overflows on this "
            "text (non-finite activations); no result to report"
        )
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / max(bytes_, 1),
        "tokens": tokens,
    }


@torch.no_grad()
def generate(
    run: LoadedRun, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 50, seed: int = 0
) -> str:
    """Sample a continuation (temperature 0 = greedy). No KV cache: fine at these sizes."""
    g = torch.Generator().manual_seed(seed)
    tok = run.need_tokenizer()
    ids = tok.encode(prompt, add_special_tokens=False).ids or [0]
    device = next(run.model.parameters()).device
    limit = run.cfg.model.max_seq_len
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-limit:]], device=device)
        logits = run.model(x).logits[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        ids.append(nxt)
    return tok.decode(ids)
