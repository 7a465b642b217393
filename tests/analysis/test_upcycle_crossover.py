"""benchmarks/upcycle_crossover.py reads a crossover off continuation curves as it claims:
from curves whose difference is a + b ln s plus seed noise, the fitted crossover is the true
one, inside its interval, and its direction (gets ahead / falls behind) is the true one;
budgets past --fit-until are left out of the fit."""

import importlib.util
import math
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "upcycle_crossover.py"
_spec = importlib.util.spec_from_file_location("upcycle_crossover", _PATH)
xo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xo)

STEPS = (250, 500, 750, 1000, 1250, 1500, 1750, 2000)


def curves(a: float, b: float, seeds=(0, 1, 2), noise: float = 0.003) -> dict:
    """Held-out losses of a reference and another run per seed whose difference is a + b ln s + noise."""
    rng = np.random.default_rng(0)
    out = {}
    for s in seeds:
        ref = {st: 4.0 - 0.1 * math.log(st) + rng.normal(0, 0.01) for st in STEPS}
        out["dense", s] = ref
        out["copies", s] = {st: ref[st] + a + b * math.log(st) + rng.normal(0, noise) for st in STEPS}
    return out


def test_the_crossover_is_read_where_the_difference_changes_sign():
    a, b = 0.08, -0.012  # behind early, ahead from exp(a / 0.012) = 786 steps
    got = xo.predict(curves(a, b), [0, 1, 2], "dense", "copies", until=2000, boots=400)
    assert got["gets_ahead"] and abs(got["b"] - b) < 0.003
    truth = math.exp(a / -b)
    lo, hi = got["interval"]
    assert lo <= truth <= hi and abs(got["crossover"] - truth) / truth < 0.25, got
    # the other way: ahead at first, behind from its crossover
    back = xo.predict(curves(-0.08, 0.012), [0, 1, 2], "dense", "copies", until=2000, boots=100)
    assert not back["gets_ahead"] and back["interval"][0] <= truth <= back["interval"][1]
    # only the budgets up to --fit-until enter the fit: a change after it does not move the prediction
    late = curves(a, b)
    for s in (0, 1, 2):
        late["copies", s][2000] += 1.0
    early = xo.predict(late, [0, 1, 2], "dense", "copies", until=1750, boots=50)
    again = xo.predict(curves(a, b), [0, 1, 2], "dense", "copies", until=1750, boots=50)
    assert early["crossover"] == again["crossover"]
