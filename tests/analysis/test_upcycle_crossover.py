"""benchmarks/upcycle_crossover.py reads a crossover off continuation curves as it claims:
runs are compared at equal total compute (a run that costs twice the FLOPs a step is set
against the reference twice as far on), and from differences that are a + b ln X plus seed
noise the fitted crossover is the true one, inside its interval, in the true direction."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "upcycle_crossover.py"
_spec = importlib.util.spec_from_file_location("upcycle_crossover", _PATH)
xo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xo)


def test_runs_are_compared_at_equal_total_compute():
    # the reference spends 1 FLOP a step from the base; the other 2 a step; a run from scratch starts 1,000 before it
    ref = xo.on_compute({st: 5.0 - 0.1 * math.log(st) for st in range(250, 4001, 250)}, 0.0, 1.0)
    other = xo.on_compute({250: 4.0, 500: 3.9, 1000: 3.8}, 0.0, 2.0)
    got = dict(xo.differences(ref, other))
    assert sorted(got) == [500.0, 1000.0, 2000.0]  # the other's evaluations, at their compute
    assert got[1000.0] == pytest.approx(3.9 - (5.0 - 0.1 * math.log(1000)))  # the ref at step 1,000, not 500
    between = xo.at(ref, 625.0)  # between evaluations: linear in log compute
    assert between == pytest.approx(5.0 - 0.1 * math.log(625))
    scratch = xo.on_compute({250: 6.0, 1000: 5.0, 1250: 4.9}, -1000.0, 1.0)
    assert xo.differences(ref, scratch) == [(250.0, pytest.approx(4.9 - (5.0 - 0.1 * math.log(250))))]
    assert xo.differences(ref, xo.on_compute({4250: 3.0}, 0.0, 1.0)) == []  # beyond the reference: no extrapolation


def diffs(a: float, b: float, seeds=(0, 1, 2), noise: float = 0.003) -> dict:
    """Per seed, (X, difference) at eight budgets with difference a + b ln X + noise."""
    rng = np.random.default_rng(0)
    xs = np.geomspace(1e12, 2e13, 8)
    return {s: [(x, a + b * math.log(x) + rng.normal(0, noise)) for x in xs] for s in seeds}


def test_the_crossover_is_read_where_the_difference_changes_sign():
    truth = 6e12
    b = -0.02
    got = xo.predict(diffs(-b * math.log(truth), b), boots=400)  # behind first, ahead from 6e12 FLOPs
    lo, hi = got["interval"]
    assert got["gets_ahead"] and lo <= truth <= hi and abs(got["crossover"] - truth) / truth < 0.25, got
    back = xo.predict(diffs(b * math.log(truth), -b), boots=100)  # ahead first, behind from 6e12
    assert not back["gets_ahead"] and back["interval"][0] <= truth <= back["interval"][1]
