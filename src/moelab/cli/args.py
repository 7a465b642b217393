"""What the commands share: the argument kinds the parser reads off the annotations
(positional or flag, metavar, repeatable), the range checks that name a flag, and how
this invocation was spelled. tyro builds each command's parser from its function's
signature and docstring, so an option is declared once: where the function takes it."""

from __future__ import annotations

import math
from typing import Annotated

from tyro.conf import Positional, UseAppendAction, arg, create_mutex_group

from ..errors import ConfigError

Run = Annotated[str, Positional, arg(metavar="RUN")]
Source = Annotated[str, Positional, arg(metavar="SRC")]
Recipe = Annotated[str, Positional, arg(metavar="RECIPE")]
Overrides = Annotated[tuple[str, ...], Positional, arg(metavar="KEY=VALUE")]
SetEach = Annotated[tuple[str, ...], arg(name="set", metavar="KEY=VALUE"), UseAppendAction]
Json = Annotated[bool, arg(name="json")]
# Flags that exclude each other: resume a folder's work, or replace it; a budget in steps or in tokens.
Fresh = create_mutex_group(required=False, title="existing --out")
Budget = create_mutex_group(required=False, title="budget")

INVOCATION: list[str] = []  # argv of this `moelab` call; finetune-report records it to be rerun


def require(ok: bool, flag: str, expected: str, got) -> None:
    """Arguments are checked where they enter: a bad one names its flag."""
    if not ok:
        raise ConfigError(f"{flag}: expected {expected}, got {got!r}")


def positive(**values: float | None) -> None:
    """Each given value (None = not given) is a finite number > 0; the error names it as its flag."""
    for name, v in values.items():
        require(v is None or (math.isfinite(v) and v > 0), "--" + name.replace("_", "-"), "a positive number", v)


def number_list(text: str, kind, flag: str) -> list:
    """'64,128,256' as numbers of `kind`, each positive."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag}: expected a comma-separated list of positive numbers, got {text!r}")
    return values
