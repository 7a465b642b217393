"""The local multi-process launcher fails - never hangs - when a rank stalls or raises."""
import time

import pytest

from moelab.parallel.local import run_local


def _stall_rank_1(rank):
    if rank == 1:
        time.sleep(900)  # far past any deadline below: only a kill ends it
    return rank


def _raise_on_rank_0(rank):
    if rank == 0:
        raise ValueError("rank zero is broken")
    return rank


def _square(rank):
    return rank * rank


def test_a_stalled_rank_is_named_and_killed():
    t0 = time.monotonic()
    assert run_local(2, _square, timeout=600) == [0, 1]
    spawn = time.monotonic() - t0  # start-up and import on this host, as it is now
    deadline = max(8.0, 4 * spawn)  # one a healthy rank meets even when the host is slow or busy
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1\] returned nothing"):
        run_local(2, _stall_rank_1, timeout=deadline)
    assert time.monotonic() - t0 < deadline + 120  # killed at the deadline, not waited for


def test_a_failing_rank_reports_its_traceback_and_results_come_back_in_rank_order():
    with pytest.raises(RuntimeError, match=r"(?s)rank 0: .*ValueError: rank zero is broken"):
        run_local(2, _raise_on_rank_0, timeout=60)
    assert run_local(3, _square, timeout=60) == [0, 1, 4]
