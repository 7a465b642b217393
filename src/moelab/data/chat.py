"""Chat formats for SFT: moelab's plain-text template, or the model's own.

A run imported from Hugging Face keeps the source's `tokenizer_config.json` (and
`chat_template.jinja`, if any). With `finetune.chat_template=auto` its Jinja template
renders the conversations, exactly as `transformers`' `apply_chat_template` would
(same sandboxed environment and variables), and its `eos_token` ends prompt/completion
examples. Otherwise moelab's template is used (see sft.py).

Which tokens a Jinja template trains is found by rendering prefix by prefix: for an
assistant turn i, the text of turns < i with the generation prompt is context, and what
turn i adds after it (the reply and whatever end-of-turn marker the template writes) is
trained. A template that does not extend its own prefixes this way is refused, naming
the fallback, rather than guessed at.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .tokenizer import EOS

# What a run folder keeps of a Hugging Face tokenizer besides tokenizer.json.
TOKENIZER_EXTRAS = ("tokenizer_config.json", "chat_template.jinja")

# (text, trained) pieces; the text EOS stands for the format's end-of-text token id.
Segments = tuple[tuple[str, bool], ...]
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


@dataclass(frozen=True)
class ChatFormat:
    """How chat and prompt/completion examples become text: a Jinja chat template (None = moelab's plain-text one), the
    end-of-text token and the special tokens the template sees."""

    template: str | None = None  # Jinja source; None = moelab's plain-text template
    eos_token: str = EOS
    special: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ... as the template sees them
    origin: str = "moelab"

    def describe(self) -> str:
        """Which template this is, in words (printed once at fine-tuning start)."""
        return "moelab's plain-text chat template" if self.template is None else f"the chat template of {self.origin}"

    def prompt_completion(self, prompt: str, completion: str) -> Segments:
        """Segments of a prompt/completion example: the prompt is context; the completion and
        end-of-text are trained."""
        return (prompt, False), (completion, True), (EOS, True)

    def chat(self, messages: list[dict], where: str) -> Segments:
        """Segments of a chat (list of role/content messages): assistant turns are trained, everything else is context.
        ConfigError naming `where` for a malformed message or a chat without an assistant turn."""
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: each message needs role in {sorted(ROLES)} and a string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant turn, so nothing to learn")
        return self._moelab(messages) if self.template is None else self._jinja(messages, where)

    @staticmethod
    def _moelab(messages: list[dict]) -> Segments:
        segs = []
        for m in messages:
            segs.append((f"### {ROLES[m['role']]}:\n", False))
            if m["role"] == "assistant":
                segs += [(m["content"], True), (EOS, True), ("\n", False)]
            else:
                segs.append((m["content"] + "\n", False))
        return tuple(segs)

    def _jinja(self, messages: list[dict], where: str) -> Segments:
        render = _compiled(self.template)
        kw = dict(self.special)
        segs, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            context = render(messages=messages[:i], add_generation_prompt=True, **kw)
            full = render(messages=messages[: i + 1], add_generation_prompt=False, **kw)
            if not (context.startswith(done) and full.startswith(context)):
                raise ConfigError(
                    f"{where}: {self.describe()} does not render the conversation prefix by "
                    "prefix, so the assistant tokens cannot be told apart; set "
                    "finetune.chat_template=moelab"
                )
            segs += [(context[len(done) :], False), (full[len(context) :], True)]
            done = full
        whole = render(messages=messages, add_generation_prompt=False, **kw)
        if not whole.startswith(done):
            raise ConfigError(
                f"{where}: {self.describe()} renders the whole conversation differently from "
                "its prefixes; set finetune.chat_template=moelab"
            )
        segs.append((whole[len(done) :], False))
        return tuple(s for s in segs if s[0])


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ConfigError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render


def load_chat_format(run_dir: Path | None, choice: str = "auto") -> ChatFormat:
    """The chat format for a run folder: its own template when it has one and `choice` is auto."""
    if choice not in ("auto", "moelab"):
        raise ConfigError(f"finetune.chat_template: expected 'auto' or 'moelab', got {choice!r}")
    if run_dir is None:
        return ChatFormat()
    cfg_file, jinja_file = Path(run_dir) / "tokenizer_config.json", Path(run_dir) / "chat_template.jinja"
    tc = {}
    if cfg_file.is_file():
        try:
            tc = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    special = tuple(
        (k, s) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (s := _token_str(tc.get(k))) is not None
    )
    eos = _token_str(tc.get("eos_token")) or EOS
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if choice == "moelab" or not template:
        return ChatFormat(eos_token=eos)
    return ChatFormat(template, eos, special, origin=str(run_dir))


def copy_tokenizer_extras(src_dir: Path, dst_dir: Path) -> None:
    """Copy the tokenizer's config, special-token map and chat template files of `src_dir`
    (those present) into `dst_dir`."""

    for name in TOKENIZER_EXTRAS:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
