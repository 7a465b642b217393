"""Text in, text out: prompts tokenized with the run's tokenizer, decoded together with the KV
cache, cut at the first stop string."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenizer import EOS
from ..errors import ConfigError
from ..store.run import LoadedRun
from .decode import STOP, Sampler, decode, decode_uncached


@dataclass
class Completion:
    """One prompt's continuation (text without the prompt), its new tokens and why it ended: "length"
    (max_new_tokens), "eos" (end of text), "stop" (a stop string, cut off) or "context" (the model's
    max_seq_len is full)."""

    prompt: str
    text: str
    tokens: int
    finish: str


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: a .jsonl with a "prompt" field per line, else one prompt per non-empty line
    (write "\\n" for a newline inside a prompt)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts: {path} is not a file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--prompts: {path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ConfigError(f'--prompts: {path} line {n} has no string field "prompt"')
            out.append(obj["prompt"])
        else:
            out.append(line.replace("\\n", "\n"))
    if not out:
        raise ConfigError(f"--prompts: {path} holds no prompt")
    return out


@torch.no_grad()
def generate(
    run: LoadedRun,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    use_cache: bool = True,
) -> list[Completion]:
    """Continue each prompt. Temperature 0 = greedy. The prompts decode as one batch with a KV cache
    (`use_cache=False`: one at a time, the whole context again for each token, sliding past
    model.max_seq_len instead of stopping there). An empty prompt starts from the end-of-text token,
    as a document does in training."""
    tok = run.need_tokenizer()
    eos = tok.token_to_id(EOS)
    start = [eos if eos is not None else 0]
    ids = [tok.encode(p, add_special_tokens=False).ids or start for p in prompts]
    sampler = Sampler(temperature, top_k, torch.Generator().manual_seed(seed))
    stops = [s for s in stop if s]

    def stopped(_: int, new: list[int]) -> bool:
        tail = tok.decode(new[-64:])  # a stop string ends within the last tokens it completed
        return any(s in tail for s in stops)

    model = run.model.eval()
    eos_stop = None if ignore_eos else eos
    if use_cache:
        decoded = decode(model, ids, max_new_tokens, sampler=sampler, eos=eos_stop, stop=stopped if stops else None)
    else:
        check = stopped if stops else None
        decoded = [decode_uncached(model, p, max_new_tokens, sampler=sampler, eos=eos_stop, stop=check) for p in ids]
    out = []
    for prompt, d in zip(prompts, decoded, strict=True):
        text = tok.decode(d.tokens)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        finish = d.finish
        if cut >= 0:
            text, finish = text[:cut], STOP
        out.append(Completion(prompt, text, len(d.tokens), finish))
    return out
