"""Evaluating a loaded run on a source, and generating text (loading lives in `moelab.runs`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import dataset_for
from .data.loader import PackedSequences
from .data.tokenizer import token_byte_lengths
from .errors import NonFiniteError
from .store.run import LoadedRun

__all__ = ["evaluate_source", "generate"]


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
