"""Launch N real processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
the environment, gloo on CPU) and fail - never hang - when one stalls."""
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, errors):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      MOELAB_DIST_TIMEOUT_S="120")
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def spawn(world: int, fn, *args, timeout: float = 240.0) -> None:
    """Run fn(rank, *args) in `world` processes; AssertionError with each failing rank's
    traceback, or naming the ranks still running after `timeout` seconds (then killed)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout} s (a hang)\n" + "\n".join(msgs))
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise AssertionError(f"ranks {failed} failed:\n" + "\n".join(msgs))
