"""`moelab scaling DIR --predict WIDTH,TOKENS`: a check of the fitted laws that can fail. The
loss of each family at a point outside the grid is predicted (with its interval) and
printed *before* that run is trained; then it is trained (each of the grid's seeds) and the
measurement is set against the prediction. OUT/predictions.jsonl keeps every check with the
grid its fit saw; a check already made on this grid is read back, not trained again. After the
grid has grown, the same point is predicted anew from the new fit, and the runs that were
already there when it was said (trained for an earlier check) are named in the record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..curves import read_run
from .fit import finished_rows, fit_families, predict
from .grid import COUNT, point_config, read_grid, train_point

PREDICTIONS = "predictions.jsonl"


def predict_and_check(out: Path, width: int, tokens: int, *, train_runs: bool = True, say=print) -> list[dict]:
    """For each family: the prediction at (width, tokens), said first; then (`train_runs`) the
    measured loss over the grid's seeds and the relative error. Returns one record per family."""
    out = Path(out)
    grid = read_grid(out)
    rows = finished_rows(out, grid)
    done: dict[tuple, dict] = {}
    said: dict[tuple, dict] = {}  # this grid's checks: measured, and predicted with their runs begun (a killed check)
    if (out / PREDICTIONS).is_file():
        for line in (out / PREDICTIONS).read_text().splitlines():
            r = json.loads(line)
            if r.get("grid") == grid.settings():  # a check of an earlier, smaller grid's fit is not this fit's
                key = (r["family"], r["width"], r["tokens_budget"])
                (done if "measured" in r else said)[key] = r
    records = []
    fits, _ = fit_families(rows, grid)
    for family in grid.families:
        fam = fits[family]
        cfgs = [point_config(grid, family, width, tokens, s) for s in range(grid.seeds)]
        cfg = cfgs[0]
        n = cfg.model.param_counts()[COUNT]
        d = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        value, (lo, hi) = predict(fam.law, fam.boots, n, d)
        grid_n = max(r["params"][COUNT] for r in fam.rows)
        grid_d = max(r["tokens"] for r in fam.rows)
        say(
            f"{family}: d={width} (N={n:,}, {n / grid_n:.1f}x the grid's largest), {d:,} tokens "
            f"({d / grid_d:.1f}x the grid's longest): predicted held-out loss {value:.4f} [{lo:.4f}, {hi:.4f}]"
        )
        rec: dict = {"family": family, "width": width, "tokens_budget": tokens, "params": n, "tokens": d,
               "predicted": value, "predicted_interval": [lo, hi], "grid": grid.settings()}  # fmt: skip
        key = (family, width, tokens)
        in_grid = [r["loss"] for r in fam.rows if r["width"] == width and r["tokens_budget"] == tokens]
        if in_grid:  # a grid point: the fit saw these runs; the check is only that it reads them back
            rec["measured_runs"] = in_grid
            rec["measured"] = float(np.mean(in_grid))
            rec["error"] = (rec["measured"] - value) / rec["measured"]
            rec["in_grid"] = True
        elif key in done and "measured" in done[key]:
            rec = done[key]
        elif train_runs:
            losses = []
            if key in said:
                rec["runs_before_prediction"] = said[key]["runs_before_prediction"]
            else:  # on record before any of its runs trains
                rec["runs_before_prediction"] = [c.name for c in cfgs if (out / "predict" / c.name).exists()]
                with open(out / PREDICTIONS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            for c in cfgs:
                run_dir = out / "predict" / c.name
                if train_point(c, run_dir):
                    losses.append(read_run(run_dir).val_loss[-1])
            rec["measured_runs"] = losses
            rec["measured"] = float(np.mean(losses)) if losses else None
            if rec["measured"] is not None:
                rec["error"] = (rec["measured"] - value) / rec["measured"]
            with open(out / PREDICTIONS, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if rec.get("measured") is not None:
            earlier = len(rec.get("runs_before_prediction", []))
            before = f" ({earlier} of them trained before this prediction, for an earlier grid)" if earlier else ""
            say(
                f"{family}: measured {rec['measured']:.4f} over {len(rec['measured_runs'])} seed(s)"
                f"{' (the grid runs the fit saw: not a check)' if rec.get('in_grid') else ''}"
                f"{before}: "
                f"{100 * rec['error']:+.2f}% against the prediction "
                f"({'inside' if lo <= rec['measured'] <= hi else 'outside'} its interval)"
            )
        elif train_runs:
            say(f"{family}: every run diverged: no measurement")
        records.append(rec)
    return records
