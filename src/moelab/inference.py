"""Evaluating a loaded run on a source (loading lives in `moelab.store.run`; generating in `moelab.serve`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import dataset_for
from .data.loader import PackedSequences
from .data.tokenizer import token_byte_lengths
from .errors import NonFiniteError
from .store.run import LoadedRun

__all__ = ["evaluate_source"]


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
