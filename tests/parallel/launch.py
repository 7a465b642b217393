"""Launch N real processes the way torchrun does, failing - never hanging - when one stalls."""
import os

from moelab.parallel.local import run_local


# what the ranks of these tests import: the forkserver imports it once, every rank starts with it
PRELOAD = ("moelab.train", "moelab.parallel.parallelize", "moelab.parallel.pipeline")


def _quiet(rank, fn, args):
    import torch

    os.environ["MOELAB_DIST_TIMEOUT_S"] = "120"  # read when the process group is created
    torch.set_num_threads(1)
    return fn(rank, *args)


def spawn(world: int, fn, *args, timeout: float = 240.0):
    """fn(rank, *args) in `world` processes (1 thread each); their results in rank order."""
    try:
        return run_local(world, _quiet, fn, args, timeout=timeout, preload=PRELOAD)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
