"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the training split.

Byte-level means every string round-trips and every token covers a whole number of
UTF-8 bytes, which is what bits-per-byte needs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_bytes: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (with <|endoftext|> and <|pad|>) on at most `max_bytes`
    of `texts`."""

    def capped():
        seen = 0
        for t in texts:
            if seen >= max_bytes:
                return
            yield t
            seen += len(t)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(capped(), trainer)
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token; ConfigError when the tokenizer has none."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise ConfigError(f"tokenizer has no end-of-text token '{EOS}'")
    return i


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    byte_level = isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
    for s, i in vocab.items():
        if s in special:
            continue
        # In byte-level vocabularies each character stands for exactly one byte.
        out[i] = len(s) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return out
