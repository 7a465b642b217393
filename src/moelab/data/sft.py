"""Supervised fine-tuning data: chat or prompt/completion examples with loss masking.

Sources: a `.jsonl` whose lines hold `messages` (a list of {"role", "content"}) or
`prompt` and `completion`; or `stdlib-docstrings`, built in: prompt = a standard-library
function's signature and docstring, completion = its body, held out by module.

Chat template: the model's own when its run folder has one (imported from Hugging Face,
see chat.py), else moelab's plain text, which any byte-level tokenizer can learn:
    ### System:\\n{content}\\n   ### User:\\n{content}\\n   ### Assistant:\\n{content}<|endoftext|>
The loss covers only assistant contents and the end-of-text after each (for
prompt/completion: the completion and its end-of-text).

Batching: one example per row, padded at the end to the longest row of the batch (at
most seq_len + 1 tokens). Padding has target -100 and mask False, so it is neither in
the loss nor routed to experts, and with causal attention it cannot affect real tokens;
no two examples ever share a row, so attention never crosses examples.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..config import ConfigError
from .chat import ChatFormat, Segments
from .sources import jsonl_lines, stdlib_files, unit_hash
from .tokenizer import EOS, PAD


@dataclass(frozen=True)
class Example:
    """One fine-tuning example: its group (for the split) and its (text, trained?) segments."""

    group: str  # split unit (module or file:line)
    segments: Segments  # (text, trained?) in order; EOS = the end-of-text token


MOELAB_FORMAT = ChatFormat()  # moelab's own plain-text chat format


def read_sft_jsonl(path: Path, fmt: ChatFormat = MOELAB_FORMAT) -> list[Example]:
    """Examples of a .jsonl whose lines hold `messages` (chat) or `prompt`/`completion`; ConfigError naming file and
    line for a malformed one."""
    out = []
    with path.open("rb") as f:
        for n, obj in jsonl_lines(path, f):
            where = f"{path}:{n}"
            if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                segs = fmt.chat(obj["messages"], where)
            elif (
                isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str)
            ):
                segs = fmt.prompt_completion(obj["prompt"], obj["completion"])
            else:
                raise ConfigError(f"{where}: expected 'messages' or 'prompt' and 'completion'")
            out.append(Example(f"{path.name}:{n}", segs))
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


@functools.lru_cache(maxsize=2)
def stdlib_docstring_examples(max_chars: int = 2000) -> tuple[Example, ...]:
    """Functions with a docstring and a body, signature+docstring -> body (cached: parsing
    the whole standard library takes seconds, and a report fine-tunes many times)."""

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_files():
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        module = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (
                isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
            ):
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            prompt = "".join(lines[start : doc.end_lineno])
            body = "".join(lines[doc.end_lineno : node.end_lineno])
            if body.strip() and len(prompt) + len(body) <= max_chars:
                out.append(Example(module, ((prompt, False), (body, True), (EOS, True))))
    return tuple(out)


def load_sft(
    source: str, val_fraction: float = 0.05, fmt: ChatFormat = MOELAB_FORMAT
) -> tuple[list[Example], list[Example]]:
    """Examples split by group (module for stdlib-docstrings), deterministically."""
    examples: list[Example]
    if source == "stdlib-docstrings":
        examples = list(stdlib_docstring_examples())
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(
                f"fine-tuning data '{source}' does not exist (expected 'stdlib-docstrings' or a .jsonl file)"
            )
        if not path.is_file() or path.suffix != ".jsonl":
            raise ConfigError(f"fine-tuning data '{source}': expected 'stdlib-docstrings' or an existing .jsonl")
        examples = read_sft_jsonl(path, fmt)
    train = [e for e in examples if unit_hash(e.group) >= val_fraction]
    val = [e for e in examples if unit_hash(e.group) < val_fraction]
    if not val or not train:
        cut = max(1, len(examples) // 20)
        train, val = examples[:-cut], examples[-cut:]
    if not train:
        raise ConfigError(f"fine-tuning data '{source}': need at least 2 examples")
    return train, val


class SFTExamples:
    """Tokenised examples; `batch(idx)` -> inputs, targets (-100 = no loss), mask."""

    def __init__(self, examples: list[Example], tok: Tokenizer, seq_len: int, eos_token: str = EOS):
        self.seq_len = seq_len
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise ConfigError(f"the tokenizer has no end-of-text token {eos_token!r}")
        # padding never reaches the loss or the experts, so any id will do when there is no PAD
        self.pad = tok.token_to_id(PAD) if tok.token_to_id(PAD) is not None else eos
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.dropped = 0  # examples with no trained token within seq_len + 1 tokens
        for ex in examples:
            ids, train = [], []
            for text, trained in ex.segments:
                seg = [eos] if text == EOS else tok.encode(text, add_special_tokens=False).ids
                ids += seg
                train += [trained] * len(seg)
            ids, train = ids[: seq_len + 1], train[: seq_len + 1]
            if len(ids) >= 2 and any(train[1:]):
                self.rows.append((np.asarray(ids, np.int64), np.asarray(train, bool)))
            else:
                self.dropped += 1
        if not self.rows:
            raise ConfigError("no fine-tuning example has a trained token within data.seq_len")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and padding mask (each B x S) of the examples at `idx`: targets are -100 outside trained
        segments and on padding; rows are right-padded."""
        rows = [self.rows[i] for i in idx]
        L = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), L), self.pad or 0, dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for r, (ids, train) in enumerate(rows):
            n = len(ids) - 1
            x[r, :n] = torch.from_numpy(ids[:-1])
            tgt = torch.from_numpy(ids[1:]).clone()
            tgt[~torch.from_numpy(train[1:])] = -100  # loss only where the *target* is trained
            y[r, :n] = tgt
            mask[r, :n] = True
        return x, y, mask
