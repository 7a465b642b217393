"""LR-scaling fits on synthetic data, a tiny sweep end to end (killed and resumed), lr=auto."""
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY, run_cli
from moelab.analysis.studies.lr_scaling import (MM1_A, MM1_B, fit_power_law, quadratic_optimum,
                                        resolve_auto_lr, scale_model)
from moelab.run_config import load_config


def test_power_law_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e6, 1e9, 8)
    lr = np.exp(-0.35 * np.log(n) - 1.2 + rng.normal(0, 0.05, n.size))
    fit = fit_power_law(n.tolist(), lr.tolist())
    assert fit["a"] == pytest.approx(-0.35, abs=0.03) and fit["b"] == pytest.approx(-1.2, abs=0.5)
    assert fit["r2"] > 0.98
    assert fit["a_interval"][0] <= fit["a"] <= fit["a_interval"][1]


def test_quadratic_optimum_and_edge_warning():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    losses = [(math.log(lr) - math.log(2e-3)) ** 2 + 2.0 for lr in lrs]
    lr, loss, edge = quadratic_optimum(lrs, losses)
    assert lr == pytest.approx(2e-3, rel=1e-6) and loss == pytest.approx(2.0) and not edge
    with pytest.warns(UserWarning, match="edge of the grid"):
        lr, _, edge = quadratic_optimum(lrs, [5, 4, 3, 2, 1])
    assert edge and lr == pytest.approx(1e-2)


def test_lr_auto_uses_mm1_or_a_fit(tmp_path):
    cfg = load_config("tiny-moe", ["optim.lr=auto"])
    n = cfg.model.param_counts()["non_embedding"]
    assert resolve_auto_lr(cfg) == pytest.approx(math.exp(MM1_A * math.log(n) + MM1_B))
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"count": "active", "fit": {"a": -0.5, "b": -1.0}}))
    cfg = load_config("tiny-moe", ["optim.lr=auto", f"optim.lr_fit={fit}"])
    assert resolve_auto_lr(cfg) == pytest.approx(math.exp(-0.5 * math.log(cfg.model.param_counts()["active"]) - 1.0))


def test_size_ladder_scales_width_and_depth():
    base = load_config("tiny-moe").model
    small, big = scale_model(base, 64), scale_model(base, 256)
    assert (small.n_layers, big.n_layers) == (2, 8) and small.head_dim == base.head_dim
    assert big.moe.d_expert == 2 * base.moe.d_expert and big.moe.d_model == 256
    assert small.param_counts()["non_embedding"] < base.param_counts()["non_embedding"] < big.param_counts()["total"]


def test_tiny_sweep_killed_resumed_and_fitted(tmp_path, text_file):
    out = tmp_path / "sweep"
    sets = [a for o in TINY for a in ("--set", o)]
    args = ["--recipe", "tiny-dense", "--sizes", "32,64", "--lrs", "1e-3,1e-2,1e-1", "--data", str(text_file),
            "--out", str(out), "--steps", "6", "--quiet", *sets]
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "lr-sweep", *args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ((out / "sweep.jsonl").exists() and (out / "sweep.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = (out / "sweep.jsonl").read_text().count("\n")
    assert 2 <= done_before < 6
    first_run = out / "runs" / "d32-lr0.001" / "metrics.jsonl"
    stamp = first_run.stat().st_mtime
    run_cli("lr-sweep", *args)
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted((r["d_model"], r["lr"]) for r in rows) == sorted((d, lr) for d in (32, 64) for lr in (1e-3, 1e-2, 1e-1))
    assert first_run.stat().st_mtime == stamp  # finished runs were not redone
    # continued with another run length, the sweep's rows would not compare: refused by key
    rc, _, err = run_cli("lr-sweep", *[a if a != "6" else "7" for a in args], check=False)
    assert rc == 2 and "steps: sweep has 6, command has 7" in err, err[-2000:]
    _, stdout, _ = run_cli("lr-fit", str(out), "--target-params", "1e8")
    assert "fit: log lr*" in stdout and "target N=100,000,000" in stdout
    fit = json.loads((out / "fit.json").read_text())
    assert len(fit["optima"]) == 2 and fit["target"]["mm1_lr"] == pytest.approx(2.445e-4, rel=1e-3)  # MM1's rule at N=1e8, by hand
    assert (out / "lr_fit.png").stat().st_size > 1000
    # --count total: N is each size's full parameter count, as the model itself has it
    run_cli("lr-fit", str(out), "--count", "total")
    from moelab import Transformer
    totals = {}
    for d in (32, 64):
        cfg = scale_model(load_config("tiny-dense", TINY).model, d)
        totals[d] = sum(p.numel() for p in Transformer(cfg).parameters())
    fit = json.loads((out / "fit.json").read_text())
    assert fit["count"] == "total" and {o["d_model"]: o["n_params"] for o in fit["optima"]} == totals
