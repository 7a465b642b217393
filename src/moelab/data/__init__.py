"""Data: sources -> documents -> tokenizer -> cached token streams -> packed sequences."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from ..config import ConfigError
from .loader import PackedSequences, Sampler, SamplerState, tokenize_documents
from .sources import Document, load_documents, split_documents
from .tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer


class Sequences(Protocol):
    """What the trainer reads: a length and batches of (inputs, targets[, padding mask])."""

    def __len__(self) -> int: ...

    def batch(self, idx) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Data:
    """Tokenizer, training and validation sequences, and UTF-8 bytes per token id (for bits per byte)."""

    tokenizer: Tokenizer
    train: Sequences
    val: Sequences
    token_bytes: np.ndarray  # UTF-8 bytes per token id, for bits per byte


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
    """Load `source`, split it by document, train (or load) the BPE tokenizer, and pack each split into seq_len windows.
    ConfigError naming the source or field when anything does not fit."""
    docs = load_documents(source, text_field)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = train_tokenizer((d.text for d in train_docs), vocab_size, tokenizer_train_bytes)
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {tok.get_vocab_size()} tokens"
        )
    if save_tokenizer_to is not None:
        tok.save(str(save_tokenizer_to))
    train = PackedSequences(tokenize_documents(train_docs, tok), seq_len, f"{source} (training split)")
    val = PackedSequences(tokenize_documents(val_docs, tok), seq_len, f"{source} (validation split)")
    return Data(tok, train, val, token_byte_lengths(tok))


__all__ = [
    "Data",
    "prepare_data",
    "Document",
    "load_documents",
    "split_documents",
    "PackedSequences",
    "Sampler",
    "SamplerState",
]
