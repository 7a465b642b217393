"""`moelab scaling`: the law fit recovers a known law and its efficiency leverage from
noisy synthetic losses, refuses grids it cannot fit, and the command trains a micro-grid
end to end, resumes after a kill, grows by a budget keeping its runs, and refuses a changed grid."""

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from conftest import grid_args, run_cli, run_main
from moelab.analysis.studies.scaling.law import Law, bootstrap, fit_law, interval
from moelab.analysis.studies.scaling.leverage import Family, leverage
from moelab.errors import ConfigError

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}  # Hoffmann et al.'s fitted law


def synthetic(law: dict, seed: int, noise: float = 0.005):
    """Losses of a 5 sizes x 4 budgets grid drawn from `law` with multiplicative noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e5, 1e7, 5), 4)
    d = np.tile(np.geomspace(1e7, 1e9, 4), 5)
    loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
    return n, d, loss * np.exp(rng.normal(0, noise, len(n)))


def test_the_fit_recovers_a_known_law_and_its_leverage_within_their_intervals():
    n, d, loss = synthetic(TRUE, seed=0)
    law = fit_law(n, d, loss)
    boots = bootstrap(n, d, loss, law, samples=120)
    assert len(boots) > 90 and not law.fixed
    for k in ("E", "alpha", "beta"):
        lo, hi = interval([getattr(b, k) for b in boots])
        assert lo <= TRUE[k] <= hi, (k, lo, TRUE[k], hi)
    assert abs(law.alpha - 0.34) < 0.03 and abs(law.beta - 0.28) < 0.03
    # an MoE whose size term is 3/4 of dense's: it matches dense at (4/3)^(1/alpha) the compute, at every C
    moe_true = dict(TRUE, A=0.75 * TRUE["A"])
    mn, md, mloss = synthetic(moe_true, seed=1)
    moe = fit_law(mn, md, mloss)
    moe_boots = bootstrap(mn, md, mloss, moe, samples=120, seed=1)
    expected = (4 / 3) ** (1 / 0.34)
    for c in (1e18, 1e20):  # inside the grid's compute and two decades above it
        els = [leverage(Family(a, 6.0, 1.0, 1.0), Family(b, 6.0, 1.0, 1.0), c)
               for a, b in zip(boots, moe_boots, strict=False)]  # fmt: skip
        lo, hi = interval(els)
        assert lo <= expected <= hi, (c, lo, expected, hi)
        assert lo <= leverage(Family(law, 6.0, 1.0, 1.0), Family(moe, 6.0, 1.0, 1.0), c) <= hi


def test_a_grid_with_no_loss_floor_fits_and_bootstraps():
    """Losses that keep falling as pure powers of N and D (no irreducible loss over the grid, as a small grid on
    an unseen corpus can show): E goes to 0 - exp of a log that underflows - and the bootstrap still starts from
    the fit."""
    n, d, loss = synthetic(dict(TRUE, E=0.0), seed=2)
    law = fit_law(n, d, loss)
    assert law.E < 0.05
    boots = bootstrap(n, d, loss, law, samples=60)
    assert len(boots) > 40
    for k in ("alpha", "beta"):
        lo, hi = interval([getattr(b, k) for b in boots])
        assert lo <= TRUE[k] <= hi, (k, lo, TRUE[k], hi)
    # where the fit's log E ends below ~-745 (a Vim-manual grid did), E is exactly 0.0: the bootstrap starts from the
    # fit's own coordinates, not from log E
    gone = replace(law, E=math.exp(-800.0), coords=(-800.0, *law.coords[1:]))
    assert gone.E == 0.0 and len(bootstrap(n, d, loss, gone, samples=20)) > 10


def test_leverage_matches_the_closed_form():
    """With equal exponents, a size coefficient k times dense's gives EL = (1/k)^(1/alpha)."""
    dense = Family(Law(**TRUE), 6.0, 1.0, 2e-9)
    moe = Family(Law(**dict(TRUE, A=TRUE["A"] / 2)), 6.0, 1.0, 3e-9)
    assert leverage(dense, moe, 1e21) == pytest.approx(2 ** (1 / 0.34), rel=1e-6)
    # the compute-optimal split minimises the loss: a neighbouring split is worse
    n, dd, best = dense.frontier(1e21)
    for f in (0.8, 1.25):
        assert float(dense.law.loss(n * f, 1e21 / (6 * n * f))) > best


def test_grids_the_law_cannot_be_read_from_are_refused_with_one_line():
    n, d, loss = synthetic(TRUE, seed=2)
    with pytest.raises(ConfigError, match="at least 2 model sizes and 2 token budgets"):
        fit_law(n[:4], d[:4], loss[:4])  # one size
    with pytest.raises(ConfigError, match="3 runs for 3 free parameters"):
        fit_law([1e5, 1e6, 1e6], [1e7, 1e7, 1e8], [3.0, 2.9, 2.8])
    rng = np.random.default_rng(3)  # losses that do not fall with size: no power law of N to find
    flat = 3.0 + 0.5 / d[:] ** 0.2 + rng.normal(0, 0.02, len(d))
    with pytest.raises(ConfigError, match="did not converge"):
        fit_law(n, d, flat)


def test_micro_grid_end_to_end_killed_resumed_and_guarded(tmp_path, prose, capsys):
    out = tmp_path / "scaling"
    args = grid_args(prose, out)
    proc = subprocess.Popen([sys.executable, "-m", "moelab", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    rows, deadline = out / "runs.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (rows.is_file() and rows.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert rows.is_file() and len(rows.read_text().splitlines()) < 8, "the grid was not caught half-way"
    first = rows.read_text().splitlines()[0]

    _, stdout, _ = run_cli(*args)  # resumes: finished runs are kept, the rest trained
    lines = rows.read_text().splitlines()
    assert lines[0] == first and len(lines) == 8
    assert len({json.loads(x)["name"] for x in lines}) == 8
    summary = json.loads((out / "scaling.json").read_text())
    assert (out / "report.html").is_file() and all((out / f).is_file() for f in ("laws.png", "leverage.png"))
    for fam in ("dense", "moe"):  # 2 sizes x 2 budgets: both exponents fixed at the prior, and said so
        law = summary["laws"][fam]
        assert set(law["fixed"]) == {"alpha", "beta"} and law["alpha"] == 0.34 and law["beta"] == 0.28
    assert "fixed at the prior" in stdout
    assert stdout.count("the MoE matches a dense model trained on") + stdout.count("never reaches") == 2

    # --predict at a grid point reads back the fitted law there (no training)
    law = summary["laws"]["dense"]
    row = next(json.loads(x) for x in lines if json.loads(x)["name"] == "dense-d64-t32768-s0")
    n, d = row["params"]["active_non_embedding"], row["tokens"]
    expected = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
    _, said, _ = run_main(capsys, "scaling", str(out), "--predict", "64,32768")
    assert f"predicted held-out loss {expected:.4f}" in said.splitlines()[0], said
    assert "not a check" in said and not (out / "predict").exists()

    # --predict off the grid: the prediction is on record before its runs train, then set against their loss; asked
    # again, the check is read back
    _, first, _ = run_main(capsys, "scaling", str(out), "--predict", "32,16384")
    checks = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert ["measured" in r for r in checks] == [False, True, False, True]
    assert checks[0]["predicted"] == checks[1]["predicted"] and f"{checks[0]['predicted']:.4f}" in first.splitlines()[0]
    metrics = (out / "predict" / "dense-d32-t16384-s0" / "metrics.jsonl").read_text().splitlines()
    assert checks[1]["measured"] == [json.loads(x) for x in metrics if "val_loss" in x][-1]["val_loss"]
    _, again, _ = run_main(capsys, "scaling", str(out), "--predict", "32,16384")
    assert again == first and len((out / "predictions.jsonl").read_text().splitlines()) == 4

    # a continued grid with other settings is refused, naming the setting, and nothing changes
    before = rows.read_text()
    rc, _, err = run_cli(*grid_args(prose, out, tokens="8192,65536"), check=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tokens" in err, err
    assert rows.read_text() == before
    assert math.isfinite(summary["leverage"][0]["flops"])

    # a grid may grow by a budget (or width, or seed): the finished runs are kept, only the new points trained and
    # the law refitted over all of them; the smaller grid is then a changed one
    run_main(capsys, *grid_args(prose, out, tokens="4096,8192,32768"))
    grown = rows.read_text().splitlines()
    assert grown[:8] == before.splitlines() and len(grown) == 12
    assert sorted({json.loads(x)["tokens_budget"] for x in grown}) == [4096, 8192, 32768]
    refit = json.loads((out / "scaling.json").read_text())
    assert refit["grid"]["tokens"] == [4096, 8192, 32768] and len(refit["runs"]) == 12
    rc, _, err = run_cli(*args, check=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tokens" in err, err
    # the grown grid's fit predicts the same point anew; the runs an earlier check trained are named, not retrained
    _, third, _ = run_main(capsys, "scaling", str(out), "--predict", "32,16384")
    new = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()[4:]]
    assert len(new) == 4 and all(r["grid"]["tokens"] == [4096, 8192, 32768] for r in new)
    assert new[1]["runs_before_prediction"] == ["dense-d32-t16384-s0"] and new[1]["measured"] == checks[1]["measured"]
    assert "1 of them trained before this prediction" in third


def test_a_grid_grows_only_by_widths_budgets_and_seeds():
    from moelab.analysis.studies.scaling.grid import Grid, grows

    base = Grid("tiny-dense", "tiny-moe", "corpus", (32, 64), (8192, 32768), 1, ("optim.lr=3e-3",))
    saved = base.settings()
    for more in ({"seeds": 3}, {"widths": (64, 32, 96)}, {"tokens": (4096, 8192, 32768)}, {}):
        assert grows(saved, replace(base, **more).settings()), more
    for changed in ({"seeds": 0}, {"widths": (32, 96)}, {"tokens": (8192,)}, {"data": "other"}, {"moe": "small-moe"},
                    {"overrides": ("optim.lr=1e-3",)}, {"experts": (4, 8)}):  # fmt: skip
        assert not grows(saved, replace(base, **changed).settings()), changed


def test_a_frontier_outside_the_grid_is_called_an_extrapolation():
    from moelab.analysis.studies.scaling.fit import beyond, sentence

    n, d, _ = synthetic(TRUE, seed=0)
    rows = [{"params": {"active_non_embedding": a}, "tokens": b} for a, b in zip(n, d, strict=True)]
    assert beyond(rows, {"n": 1e6, "d": 1e8}) == {"factor": 1.0, "axis": None}
    assert beyond(rows, {"n": 1e6, "d": 3e9}) == {"factor": pytest.approx(3.0), "axis": "tokens"}
    assert beyond(rows, {"n": 2e4, "d": 2e9}) == {"factor": pytest.approx(5.0), "axis": "size"}
    el = {"flops": 1e18, "el": 1.2, "el_interval": [1.1, 1.3], "el_clock": 1.0, "el_clock_interval": [0.9, 1.1],
          "moe_optimal": {"loss": 2.0}, "beyond_grid": {"factor": 3.0, "axis": "tokens"}}  # fmt: skip
    assert "3x outside the grid's token budgets: an extrapolation" in sentence(el, None)
    assert "extrapolation" not in sentence(dict(el, beyond_grid={"factor": 1.0, "axis": None}), None)
