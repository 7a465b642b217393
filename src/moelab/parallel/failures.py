"""How an expected failure ends a torchrun job: every rank exits with moelab's one line and
code 2, at about the same moment, and torchrun's failure summary names that line.

torchrun stops every worker as soon as one exits, and its summary shows, for each worker,
the traceback in its error file (TORCHELASTIC_ERROR_FILE), or "To enable traceback see ..."
where there is none. So a rank that fails:

1. prints its line and writes it into its error file (`record_for_launcher`);
2. publishes it on torchrun's agent store, which outlives the workers;
3. waits (at most `SAID_WAIT_S`) until every rank has said it before exiting.

Every rank of a multi-process run watches the store from a daemon thread
(`watch_for_peer_failures`, started before the process group exists): a rank that did not
fail itself (it waits in a collective for the rank that failed: rank 0 prepares the data
alone; one rank's disk fills) prints the published line, records it, says it and exits 2
- never a traceback from a collective ("Connection closed by peer"), under gloo and NCCL
alike. A failure every rank finds by itself (a layout that does not fit, a bad flag) is
printed by each.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from ..errors import ConfigError

SAID_WAIT_S = 15.0  # how long a failing rank waits for the others to report, at most
WATCH_EVERY_S = 0.2  # how often a rank looks for a peer's failure

_reporting = threading.Lock()  # held by whichever reports for this rank: its own failure, or a peer's
_watching: list[threading.Thread] = []
# set at exit: a daemon thread still inside the store's C++ call when the interpreter finalises is ended by
# pthread_exit through a noexcept frame, which aborts the rank ("terminate called without an active exception")
_stop = threading.Event()


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when launched by torchrun (or any launcher setting the
    same environment), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    env = {k: os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    try:
        return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"RANK/LOCAL_RANK/WORLD_SIZE: expected integers, got {env}") from None


def _agent_store(timeout_s: float) -> dist.TCPStore | None:
    """A client of torchrun's agent store, or None outside torchrun or when it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, KeyError, ValueError):
        return None


def _key(name: str) -> str:
    return f"moelab/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _said_and_wait(store: dist.TCPStore, world: int) -> None:
    """Count this rank as having reported, then wait (bounded) until every rank has, so that
    all exit together and torchrun stops none of them half-way through its report."""
    store.add(_key("said"), 1)
    deadline = time.monotonic() + SAID_WAIT_S
    while int(store.add(_key("said"), 0)) < world and time.monotonic() < deadline:
        time.sleep(0.005)  # the ranks leave within a few ms of each other: torchrun looks every 100 ms


def _exit_2(signum: int, frame: object) -> None:
    os._exit(2)  # torchrun stops a rank that has said its line when another exits: it failed all the same


def report_failure(line: str) -> None:
    """Print this rank's expected failure `line` on stderr; under torchrun also tell the
    launcher and the other ranks, and wait for them to say it. Each rank prints one line:
    its own, or - when its watcher saw a peer's first - the peer's."""
    env = torchrun_world()
    if env is not None and env[2] > 1 and not _reporting.acquire(blocking=False):
        time.sleep(SAID_WAIT_S + 5)  # the watcher is printing a peer's line and ends the process
        return
    print(line, file=sys.stderr, flush=True)
    record_for_launcher(line)
    if env is None or env[2] < 2:
        return
    store = _agent_store(SAID_WAIT_S)
    if store is None:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_2)
    try:
        if int(store.add(_key("first"), 1)) == 1:  # the first failure is the one the peers repeat
            store.set(_key("line"), line)
        _said_and_wait(store, env[2])
        time.sleep(0.5)  # a rank that only repeats this line (its main thread in a collective) exits first
    except (RuntimeError, ValueError):  # the store went away: the line on stderr stands on its own
        pass


def watch_for_peer_failures() -> None:
    """Under torchrun with several ranks: a daemon thread that ends this rank (exit code 2)
    with the line another rank published when it failed. Started once per process."""
    env = torchrun_world()
    if env is None or env[2] < 2 or _watching:
        return
    store = _agent_store(SAID_WAIT_S)
    if store is None:
        return
    world = env[2]

    def watch() -> None:
        while not _stop.wait(WATCH_EVERY_S):
            try:
                if not store.check([_key("line")]):
                    continue
                line = store.get(_key("line")).decode()
            except (RuntimeError, ValueError):  # the launcher is gone: nothing left to report to
                return
            if not _reporting.acquire(blocking=False):  # this rank failed too and reports its own line
                return
            print(line, file=sys.stderr, flush=True)
            record_for_launcher(line)
            try:
                _said_and_wait(store, world)
            except (RuntimeError, ValueError):
                pass
            os._exit(2)  # the main thread may be inside a collective that will never return

    thread = threading.Thread(target=watch, name="moelab-peer-failures", daemon=True)
    thread.start()
    _watching.append(thread)
    atexit.register(_stop_watching)


def _stop_watching() -> None:
    """End the watcher before the interpreter finalises (atexit runs first), so no store call is under way then."""
    _stop.set()
    for thread in _watching:
        thread.join(timeout=5.0)


def record_for_launcher(line: str) -> None:
    """Write an expected failure's one line into torchrun's error file
    (TORCHELASTIC_ERROR_FILE, the convention of torch.distributed.elastic's `record`), so
    that the launcher's failure summary shows it as the root cause instead of "To enable
    traceback see ...". The line stands where a traceback would: it is the whole story."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the report on stderr stands on its own
        pass
