"""Process-level settings that make CPU training fast. Opt-in: a library must not
change its host process behind its back, so the trainer and benchmarks call these.
"""

from __future__ import annotations

import ctypes
import platform

import torch

from .errors import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only).

    PyTorch's CPU allocator is plain malloc. glibc serves blocks above 32 MiB with
    mmap and unmaps them on free, so every training step page-faults its big activations
    in again: on a 2-core machine that was ~30 ms per 64 MiB tensor, a third of an MoE
    layer's step (docs/benchmarks.md). Disabling mmap and heap trimming makes freed
    blocks reusable, as a caching allocator would; peak RSS is unchanged, but the
    process keeps its peak until it exits. Returns True if applied.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        )  # a C int: 1 << 40 would wrap
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok


def pick_device(name: str) -> torch.device:
    """`auto` = CUDA when available, else CPU. A device this machine lacks is a ConfigError
    naming `train.device`, not a failure deep inside the first step."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name}: CUDA is not available here (torch {torch.__version__}); "
                "use train.device=cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}: MPS is not available here; use train.device=cpu or auto")
    return dev
