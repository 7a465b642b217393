"""A scaling folder's runs -> each family's law with bootstrap intervals, its cost model, the
efficiency leverage of the MoE over dense (in FLOPs and on this machine's clock), and the
sentences a user reads. Written to OUT/scaling.json (and the report, report.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import ConfigError
from .grid import COUNT, FAMILIES, Grid, read_grid, read_rows, run_name
from .law import Law, bootstrap, fit_law, interval
from .leverage import Family, clock_leverage, fit_cost, leverage

SAMPLES = 200  # bootstrap refits per family


@dataclass
class FamilyFit:
    """One family's runs, law, bootstrap laws and cost model."""

    name: str
    rows: list[dict]
    law: Law
    boots: list[Law]
    family: Family

    def boot_family(self, i: int) -> Family:
        """The i-th bootstrap law with this family's cost model."""
        f = self.family
        return Family(self.boots[i], f.u, f.v, f.s_per_flop)


def finished_rows(out, grid: Grid) -> list[dict]:
    """The grid's rows; ConfigError saying what is left when runs are missing."""
    rows = {r["name"]: r for r in read_rows(out)}
    missing = [run_name(*p) for p in grid.points() if run_name(*p) not in rows]
    if missing:
        raise ConfigError(
            f"{out}: {len(missing)} of {len(grid.points())} runs are not finished ({missing[0]}, ...): rerun "
            "`moelab scaling` with the same flags to finish the grid"
        )
    return [rows[run_name(*p)] for p in grid.points()]


def fit_family(rows: list[dict], name: str, samples: int = SAMPLES) -> FamilyFit:
    """Fit one family's runs (those with a finite loss); ConfigError naming the family when it cannot be."""
    ok = [r for r in rows if r["family"] == name and r.get("loss") is not None and math.isfinite(r["loss"])]
    where = f"scaling fit ({name})"
    if not ok:
        raise ConfigError(f"{where}: no run of this family finished with a finite loss (every one diverged)")
    n = [r["params"][COUNT] for r in ok]
    d = [r["tokens"] for r in ok]
    loss = [r["loss"] for r in ok]
    law = fit_law(n, d, loss, where=where)
    boots = bootstrap(n, d, loss, law, samples=samples)
    u, v = fit_cost(n, [r["flops_per_token"] for r in ok])
    widest = max(r["width"] for r in ok)  # seconds per FLOP where the grid is nearest to a larger model
    spf = float(np.median([r["seconds"] / r["flops"] for r in ok if r["width"] == widest]))
    return FamilyFit(name, ok, law, boots, Family(law, u, v, spf))


def leverage_at(dense: FamilyFit, moe: FamilyFit, c: float) -> dict:
    """EL at compute `c` in FLOPs and in seconds, each with its 95% bootstrap interval
    (bootstrap laws of the two families paired by index)."""
    k = min(len(dense.boots), len(moe.boots))
    flops = [leverage(dense.boot_family(i), moe.boot_family(i), c) for i in range(k)]
    clock = [clock_leverage(dense.boot_family(i), moe.boot_family(i), c) for i in range(k)]
    return {
        "flops": c,
        "el": leverage(dense.family, moe.family, c),
        "el_interval": interval(flops),
        "el_clock": clock_leverage(dense.family, moe.family, c),
        "el_clock_interval": interval(clock),
        "moe_optimal": dict(zip(("n", "d", "loss"), moe.family.frontier(c), strict=True)),
        "dense_optimal": dict(zip(("n", "d", "loss"), dense.family.frontier(c), strict=True)),
    }


def _x(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.3g}"


def sentence(el: dict, machine: str | None) -> str:
    """The line a user needs, e.g. 'at 1e+19 FLOPs the MoE matches a dense model trained on 2.30x
    [1.80, 2.90] its compute (1.60x [..] its seconds on this machine)'."""
    lo, hi = el["el_interval"]
    clo, chi = el["el_clock_interval"]
    where = f"on {machine}" if machine else "on this machine"
    if not math.isfinite(el["el"]):
        return (
            f"at {el['flops']:.1e} FLOPs the MoE reaches a loss ({el['moe_optimal']['loss']:.4f}) that the "
            "fitted dense law never reaches at any compute"
        )
    return (
        f"at {el['flops']:.1e} FLOPs the MoE matches a dense model trained on {_x(el['el'])}x [{_x(lo)}, {_x(hi)}] "
        f"its compute ({_x(el['el_clock'])}x [{_x(clo)}, {_x(chi)}] its training seconds {where}, "
        "each family's seconds per FLOP measured at its widest grid width)"
    )


def fit_scaling(out, samples: int = SAMPLES) -> dict:
    """Fit a finished scaling folder: laws, intervals, EL at the grid's largest compute and two
    decades above it, and over a range for the plot. Returns the summary (written by the report)."""
    grid = read_grid(out)
    rows = finished_rows(out, grid)
    fits = {name: fit_family(rows, name, samples) for name in FAMILIES}
    dense, moe = fits["dense"], fits["moe"]
    c_max = max(r["flops"] for r in rows if r.get("flops"))
    c_min = min(r["flops"] for r in rows if r.get("flops"))
    points = [leverage_at(dense, moe, c) for c in (c_max, c_max * 100)]
    curve = [leverage_at(dense, moe, float(c)) for c in np.geomspace(c_min, c_max * 1e4, 17)]
    machines = {r.get("machine") for r in rows} - {None}
    machine = machines.pop() if len(machines) == 1 else None
    laws = {}
    for name, f in fits.items():
        laws[name] = f.law.as_dict() | {
            "intervals": {k: interval([getattr(b, k) for b in f.boots]) for k in ("E", "A", "alpha", "B", "beta")},
            "bootstrap_fits": len(f.boots),
            "flops_per_token": {"u": f.family.u, "v": f.family.v},
            "seconds_per_flop": f.family.s_per_flop,
        }
    return {
        "grid": {"widths": list(grid.widths), "tokens": list(grid.tokens), "seeds": grid.seeds},
        "count": COUNT,
        "laws": laws,
        "leverage": points,
        "leverage_curve": curve,
        "sentences": [sentence(p, machine) for p in points],
        "machine": machine,
        "runs": rows,
    }


def predict(law: Law, boots: list[Law], n: float, d: float) -> tuple[float, list[float]]:
    """The law's loss at (N, D) and its 95% bootstrap interval."""
    return float(law.loss(n, d)), interval([float(b.loss(n, d)) for b in boots])
