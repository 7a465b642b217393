"""Token streams cached on disk, packed into fixed-length sequences, and a seeded
sampler whose position is part of every checkpoint.

Legend: B sequences per batch, S sequence length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import ConfigError

if TYPE_CHECKING:
    from .dataset import TokenStream


def cache_dir() -> Path:
    """Where token streams are cached: $MOELAB_CACHE, else ~/.cache/moelab."""
    return Path(os.environ.get("MOELAB_CACHE", Path.home() / ".cache" / "moelab"))


def rank_slice(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of a global batch of indices: the world's slices are
    disjoint and, in rank order, make the whole batch (so the global batch and its order
    do not depend on the world size). ConfigError when the batch does not divide."""
    if len(idx) % world:
        raise ConfigError(
            f"train.batch_size: {len(idx)} sequences do not split evenly over {world} data-parallel ranks"
        )
    per = len(idx) // world
    return idx[rank * per : (rank + 1) * per]


class PackedSequences:
    """Non-overlapping windows of S+1 tokens: inputs are the first S, targets the last S."""

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int, what: str = "data"):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(
                f"{what}: {len(tokens)} tokens are fewer than one sequence of "
                f"data.seq_len={seq_len}; use more text or a shorter seq_len"
            )

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each B x S, int64) of the sequences at indices `idx`."""
        S = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * S : i * S + S + 1], dtype=np.int64) for i in idx])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


@dataclass
class SamplerState:
    """The sampler's position: epoch and index into that epoch's permutation (saved in every checkpoint)."""

    epoch: int = 0
    index: int = 0


class Sampler:
    """Visits every sequence once per epoch in an order fixed by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, state: SamplerState | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.state = state or SamplerState()
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next(self) -> np.ndarray:
        """The next batch_size sequence indices, crossing into the next epoch's permutation when this one ends."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.state.epoch)
            take = order[self.state.index : self.state.index + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.state.index += len(take)
            if self.state.index >= self.n:
                self.state = SamplerState(self.state.epoch + 1, 0)
        return np.asarray(out)
