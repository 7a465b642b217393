"""Token-level decoding: a batch of prompts prefilled once into a KV cache, then one token per
step for every unfinished sequence; and the uncached reference that runs the whole prefix again
for each token (what `generate` did before the cache, kept as the parity reference).

Legend: B prompts, P longest prompt, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from ..model.cache import KVCache
from ..model.transformer import Transformer

# finish reasons
LENGTH, EOS, STOP, CONTEXT = "length", "eos", "stop", "context"


@dataclass
class Sampler:
    """How the next token is picked from logits: temperature 0 = greedy (argmax); otherwise softmax of
    logits / temperature over the `top_k` likeliest tokens (0 = all), drawn with `generator`."""

    temperature: float = 0.0
    top_k: int = 0
    generator: torch.Generator | None = None

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) token ids."""
        logits_BV = logits_BV.float().cpu()
        if self.temperature <= 0:
            return logits_BV.argmax(-1)
        logits_BV = logits_BV / self.temperature
        if self.top_k:
            kth_B1 = torch.topk(logits_BV, min(self.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, -math.inf)
        return torch.multinomial(logits_BV.softmax(-1), 1, generator=self.generator).squeeze(-1)


@dataclass
class Decoded:
    """One prompt's continuation: new token ids, why it ended, and (when asked) the logits (n, V) each
    new token was picked from."""

    tokens: list[int]
    finish: str
    logits: list[torch.Tensor] = field(default_factory=list)


# (prompt index, its new tokens so far) -> True to stop that sequence now (e.g. a stop string appeared)
StopCheck = Callable[[int, list[int]], bool]


@torch.inference_mode()
def decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos: int | None = None,
    stop: StopCheck | None = None,
    keep_logits: bool = False,
) -> list[Decoded]:
    """Continue every prompt (token ids, at least one each) by up to `max_new_tokens` tokens with a KV
    cache. A sequence ends at `eos` (not included), when `stop` says so, after `max_new_tokens`, or when
    it fills the model's context (model.max_seq_len; a prompt longer than that keeps its last tokens).
    Greedy output equals `decode_uncached` within a context."""
    sampler = sampler or Sampler()
    limit = model.cfg.max_seq_len
    device = model.output_weight.device
    prompts = [list(p)[-limit:] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    lens_B = torch.tensor([len(p) for p in prompts])
    tokens_BP = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens_BP[b, : len(p)] = torch.tensor(p)
    mask_BP = torch.arange(P) < lens_B.unsqueeze(1)
    # the last new token is never fed back, so a sequence needs one position fewer than it ends with
    cache = KVCache(model.cfg.n_layers, B, min(limit, P + max_new_tokens - 1))
    out = [Decoded([], LENGTH) for _ in prompts]
    with parametrize.cached():  # LoRA and quantized weights: computed once, not once per token
        logits_BPV = model(tokens_BP.to(device), mask=mask_BP.to(device), cache=cache).logits
        last_BV = logits_BPV[torch.arange(B, device=device), (lens_B - 1).to(device)]
        active = [True] * B
        for _ in range(max_new_tokens):
            next_B = sampler(last_BV)
            for b in range(B):
                if not active[b]:
                    continue
                t = int(next_B[b])
                if keep_logits:
                    out[b].logits.append(last_BV[b].float().cpu())
                if eos is not None and t == eos:
                    active[b], out[b].finish = False, EOS
                    continue
                out[b].tokens.append(t)
                if stop is not None and stop(b, out[b].tokens):
                    active[b], out[b].finish = False, STOP
                elif len(out[b].tokens) == max_new_tokens:
                    active[b] = False
                elif int(cache.lengths[b]) >= limit:
                    active[b], out[b].finish = False, CONTEXT
            if not any(active):
                break
            feed_B1 = torch.tensor([[out[b].tokens[-1] if active[b] else 0] for b in range(B)], device=device)
            live_B1 = torch.tensor([[a] for a in active], device=device)
            last_BV = model(feed_B1, mask=live_B1, cache=cache).logits[:, -1]
    return out


@torch.inference_mode()
def decode_uncached(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos: int | None = None,
    stop: StopCheck | None = None,
    keep_logits: bool = False,
) -> Decoded:
    """The reference: one prompt, the whole context (its last model.max_seq_len tokens) run again for
    every new token. Slow; for parity tests and as the baseline the cache is measured against."""
    sampler = sampler or Sampler()
    limit = model.cfg.max_seq_len
    device = model.output_weight.device
    ids, res = list(prompt), Decoded([], LENGTH)
    for _ in range(max_new_tokens):
        logits_V = model(torch.tensor([ids[-limit:]], device=device)).logits[0, -1]
        t = int(sampler(logits_V.unsqueeze(0))[0])
        if keep_logits:
            res.logits.append(logits_V.float().cpu())
        if eos is not None and t == eos:
            res.finish = EOS
            break
        ids.append(t)
        res.tokens.append(t)
        if stop is not None and stop(0, res.tokens):
            res.finish = STOP
            break
    return res
