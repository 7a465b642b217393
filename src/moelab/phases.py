"""Named ranges inside a training step, for `moelab profile`: each marks one phase
(router, permute, experts, combine, attention, optimizer, ...) as a `torch.profiler`
range, so the profiler can say where a step's time goes, and - through the sequence
numbers that link each backward kernel to the forward op that made it - where its
backward's time goes too.

Off unless a profile is being recorded: outside `recording()` a phase is a null context
(one global read), so training, tests and torch.compile see no profiler calls. `HOOKS`
lets a test run code inside a phase (a sleep that must show up in that phase alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

PREFIX = "moelab/"
HOOKS: dict[str, Callable[[], None]] = {}
_recording = False


def phase(name: str) -> contextlib.AbstractContextManager:
    """The range `moelab/NAME` while a profile records; a null context otherwise."""
    return _ranged(name) if _recording else contextlib.nullcontext()


LAYER = "layer#"  # a block's range: not a phase, it says which layer the phases inside belong to


def layer(index: int) -> contextlib.AbstractContextManager:
    """The range `moelab/layer#INDEX` around a block while a profile records."""
    return phase(f"{LAYER}{index}")


@contextlib.contextmanager
def _ranged(name: str) -> Iterator[None]:
    with torch.profiler.record_function(PREFIX + name):
        yield
        hook = HOOKS.get(name)
        if hook is not None:
            hook()


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Turn the phase ranges on for the duration."""
    global _recording
    before, _recording = _recording, True
    try:
        yield
    finally:
        _recording = before
