"""Process-level settings that make CPU training fast. Opt-in: a library must not
change its host process behind its back, so the trainer and benchmarks call these.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

from .errors import ConfigError

# torch's own choice (one thread per core this process may use), before anyone changes it
DEFAULT_THREADS = torch.get_num_threads()
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


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies summed over all CPUs, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def idle_cores(window_s: float = 0.2) -> float | None:
    """How many of this machine's cores sat idle over the last `window_s` seconds; None
    where /proc/stat is not there to say."""
    a = _cpu_times()
    time.sleep(window_s)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def set_cpu_threads(threads: int | None, key: str = "train.threads") -> int:
    """Set torch's intra-op threads for this process and return the number in force.

    `threads` None = auto: torch's default (one per core it may use), lowered to the cores
    that are idle right now. Spinning OpenMP threads on a core another process is using
    slow both down several times (docs/benchmarks.md, "A busy neighbour": 2 threads beside
    a busy process trained at less than half the tokens/s of 1 thread).
    """
    if threads is not None:
        if not (isinstance(threads, int) and not isinstance(threads, bool) and threads > 0):
            raise ConfigError(f"{key}: expected a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
        if threads > 1 and (idle := idle_cores()) is not None and threads > idle + 0.5:
            print(
                f"warning: {key}={threads} but about {idle:.0f} of the cores {'is' if round(idle) == 1 else 'are'} "
                "idle now: threads on a busy core spin and slow both processes down several times (docs/benchmarks.md, "
                f"'A busy neighbour'); leave {key} unset (auto) or lower it",
                file=sys.stderr,
            )
        return threads
    idle = idle_cores()
    auto = DEFAULT_THREADS if idle is None else max(1, min(DEFAULT_THREADS, int(idle + 0.5)))
    torch.set_num_threads(auto)
    return auto


def machine_name(device: torch.device) -> str:
    """What a run's seconds were measured on: the GPU's name, or the CPU's model as the OS reports it (with the
    threads torch uses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{name}, {n} thread{'' if n == 1 else 's'}"


PARENT_ENV = "MOELAB_PARENT_PID"  # set by a moelab command for the trainings it starts


def exit_with_parent() -> None:
    """In a training a moelab command started (PARENT_ENV set): end this process once that command is gone, so a
    killed `compare` leaves no training running on the cores (a poll of the parent id, which works wherever Python
    runs). The variable is taken out of the environment: this process's own children are not watched."""
    pid = os.environ.pop(PARENT_ENV, None)
    if pid is None or not pid.isdigit():
        return
    parent = int(pid)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        print(f"moelab: the command that started this training (pid {parent}) is gone; stopping", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def is_dtensor(t) -> TypeGuard[DTensor]:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor (about a second of every command's
    start-up, with torch.distributed.checkpoint): no DTensor exists before that module is imported."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can have now: the GPU's free memory, or Linux's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(params: int, bytes_per_param: int, device: torch.device, what: str) -> None:
    """A ConfigError, before any allocation, when `params` parameters at `bytes_per_param` cannot fit in the memory
    `device` has available: without it an absurd model dies in the allocator or the kernel's OOM killer."""
    from .errors import ConfigError

    need, have = params * bytes_per_param, available_bytes(device)
    if have is not None and need > have:
        gib = 2**30
        raise ConfigError(
            f"the model ({params / 1e9:,.2f} B parameters) needs at least {need / gib:,.1f} GiB for {what} and "
            f"{device.type} has {have / gib:,.1f} GiB available: make it smaller (model.d_model, model.n_layers, "
            "model.moe.n_experts, ...); `moelab memory RECIPE` shows the whole plan"
        )
