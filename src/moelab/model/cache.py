"""A key/value cache for decoding: prefill a batch of prompts once, then one token per step.

Legend: B sequences, S new tokens this forward, C capacity (positions per sequence),
L positions attended this forward, G kv heads, Dh head dim.

Each sequence has its own length, so prompts of different lengths decode together: new
tokens are written at their sequence's next positions (rotary angles at those positions),
and a query attends to the keys at or before its own position. A forward's new tokens are
right-padded; `advance` counts only the real ones, so a padded slot is overwritten by that
sequence's next real token before any query of it can see the slot.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


class KVCache:
    """Keys and values of every attention layer for `batch` sequences of up to `capacity` positions.

    `model(tokens, mask=mask, cache=cache)` reads and extends it: tokens (B, S) are the next S
    tokens of each sequence (right-padded; `mask` marks real ones). Buffers are allocated on first
    write, in the dtype the attention produces."""

    def __init__(self, n_layers: int, batch: int, capacity: int):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long)  # positions filled per sequence
        self.k: list[torch.Tensor | None] = [None] * n_layers  # (B, G, C, Dh) each
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos_BS: torch.Tensor | None = None  # positions of this forward's tokens
        self._span = 0  # L: positions any query of this forward may attend
        self._index: torch.Tensor | None = None  # scatter index (B, G, S, Dh) of this forward's positions
        self._mask: torch.Tensor | None = None  # attention mask (B, 1, S, L) of this forward

    @property
    def batch(self) -> int:
        """B, the number of sequences."""
        return int(self.lengths.shape[0])

    def begin(self, n_new: int, max_positions: int, mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Start a forward of `n_new` tokens per sequence (`mask_BS` marks the real ones); returns their
        positions (B, S). A finished sequence fed padding writes into its last slot, never past it."""
        real_B = torch.full_like(self.lengths, n_new) if mask_BS is None else mask_BS.sum(1).cpu()
        end = int((self.lengths + real_B).max())
        if end > min(self.capacity, max_positions):
            raise ConfigError(
                f"the KV cache holds {self.capacity} positions and the model {max_positions} "
                f"(model.max_seq_len): {n_new} more tokens after {int(self.lengths.max())} do not fit"
            )
        self.pos_BS = (self.lengths.unsqueeze(1) + torch.arange(n_new)).clamp_max(self.capacity - 1)
        self._span = int(self.pos_BS.max()) + 1
        self._index = self._mask = None  # made once per forward, on the first layer's device
        return self.pos_BS

    def update(self, layer: int, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor):
        """Store this forward's keys/values of `layer`; returns (keys, values) over the first L positions
        and the attention mask (B, 1, S, L): True where a query may attend."""
        assert self.pos_BS is not None, "KVCache.begin comes before update"
        B, G, S, Dh = k_BGSDh.shape
        if self.k[layer] is None:
            shape = (B, G, self.capacity, Dh)
            self.k[layer] = k_BGSDh.new_zeros(shape)
            self.v[layer] = v_BGSDh.new_zeros(shape)
        k_all, v_all = self.k[layer], self.v[layer]
        assert k_all is not None and v_all is not None
        if self._index is None or self._mask is None:
            pos = self.pos_BS.to(k_BGSDh.device)
            self._index = pos[:, None, :, None].expand(B, G, S, Dh)
            keys_L = torch.arange(self._span, device=pos.device)
            self._mask = (keys_L.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, S, L)
        k_all.scatter_(2, self._index, k_BGSDh)
        v_all.scatter_(2, self._index, v_BGSDh.to(v_all.dtype))
        L = self._span
        return k_all[:, :, :L], v_all[:, :, :L], self._mask

    def advance(self, mask_BS: torch.Tensor | None, n_new: int) -> None:
        """After a forward: each sequence grows by its real new tokens."""
        self.lengths += n_new if mask_BS is None else mask_BS.sum(1).cpu()
        self.pos_BS = None
