"""Data: sources -> documents -> tokenizer -> cached token streams -> packed sequences."""

from __future__ import annotations

import fcntl
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from ..config import ConfigError
from ..store.outputs import save_tokenizer
from ..store.run import load_tokenizer
from .dataset import TokenDataset, is_dataset, tokenize_source, tokenizer_hash
from .loader import PackedSequences, Sampler, SamplerState, cache_dir
from .sources import Document, is_validation, iter_documents, load_documents, split_documents
from .tokenizer import token_byte_lengths, train_tokenizer


class Sequences(Protocol):
    """What the trainer reads: a length and batches of (inputs, targets[, padding mask])."""

    def __len__(self) -> int: ...

    def batch(self, idx) -> tuple[torch.Tensor, ...]:
        """(inputs, targets[, padding mask]) of the sequences at `idx`."""
        ...


@dataclass
class Data:
    """Tokenizer, training and validation sequences, and UTF-8 bytes per token id (for bits per byte)."""

    tokenizer: Tokenizer
    train: Sequences
    val: Sequences
    token_bytes: np.ndarray  # UTF-8 bytes per token id, for bits per byte


def training_texts(source: str, text_field: str, val_fraction: float) -> Iterator[str]:
    """The texts of the training split in order, streamed; what the tokenizer trains on.
    Each document is handed on only once the next one is read, so the split's fallbacks
    (no document held out: the last one is; all held out: the first trains) apply."""
    held: str | None = None
    first_val: str | None = None
    seen_val = seen_train = False
    for d in iter_documents(source, text_field):
        if is_validation(d.name, val_fraction):
            seen_val = True
            first_val = d.text if first_val is None else first_val
            continue
        if held is not None:
            yield held
        held, seen_train = d.text, True
    if held is not None and seen_val:
        yield held
    if not seen_train and first_val is not None:
        yield first_val


def dataset_for(
    source: str, tok: Tokenizer, *, text_field: str = "text", val_fraction: float = 0.05, quiet: bool = True
) -> TokenDataset:
    """The tokenized dataset of a source: the folder itself when `source` is one (its
    tokenizer must be `tok`), else a cached dataset under $MOELAB_CACHE/datasets, made on
    first use and reused while the source's files and the tokenizer are unchanged."""
    if is_dataset(source):
        ds = TokenDataset(source)
        if ds.manifest["tokenizer"] != tokenizer_hash(tok):
            raise ConfigError(
                f"{source} was tokenized with another tokenizer than this run's; tokenize the source "
                "again with `moelab tokenize SRC --out DATASET --tokenizer RUN`"
            )
        return ds
    key = f"{source}\0{tokenizer_hash(tok)}\0{text_field}\0{val_fraction}"
    out = cache_dir() / "datasets" / hashlib.sha256(key.encode()).hexdigest()[:24]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:  # processes sharing the cache make it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return TokenDataset(
            tokenize_source(
                source, out, tok, text_field=text_field, val_fraction=val_fraction, quiet=quiet, overwrite=True
            )
        )


def prepare_data(
    source: str,
    seq_len: int,
    vocab_size: int,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
    tokenizer_path: str | Path | None = None,
    tokenizer_train_bytes: int = 10_000_000,
    save_tokenizer_to: Path | None = None,
) -> Data:
    """Training and validation sequences of `source` (a text source, or a dataset folder
    from `moelab tokenize`), memory-mapped from token shards: the tokenizer is loaded from
    `tokenizer_path`, else the dataset's own, else trained on the first
    `tokenizer_train_bytes` of the training split. ConfigError naming the source or field
    when anything does not fit."""
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
    elif is_dataset(source):
        tok = TokenDataset(source).tokenizer
    else:
        tok = train_tokenizer(training_texts(source, text_field, val_fraction), vocab_size, tokenizer_train_bytes)
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()} tokens"
        )
    ds = dataset_for(source, tok, text_field=text_field, val_fraction=val_fraction, quiet=False)
    if ds.manifest["val_fraction"] != val_fraction:
        print(
            f"note: {source} holds out {ds.manifest['val_fraction']} of its documents (made so); "
            f"data.val_fraction={val_fraction} does not apply",
            file=sys.stderr,
        )
    if save_tokenizer_to is not None:
        save_tokenizer(tok, save_tokenizer_to)
    train = PackedSequences(ds.split("train"), seq_len, f"{source} (training split)")
    val = PackedSequences(ds.split("val"), seq_len, f"{source} (validation split)")
    return Data(tok, train, val, token_byte_lengths(tok))


__all__ = [
    "Data",
    "Sequences",
    "prepare_data",
    "dataset_for",
    "training_texts",
    "Document",
    "iter_documents",
    "load_documents",
    "split_documents",
    "PackedSequences",
    "Sampler",
    "SamplerState",
    "TokenDataset",
    "tokenize_source",
]
