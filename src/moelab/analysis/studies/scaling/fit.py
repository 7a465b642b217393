"""A scaling folder's runs -> each family's law with bootstrap intervals, its cost model, the
efficiency leverage of the MoE over dense (in FLOPs and on this machine's clock), and the
sentences a user reads. Written to OUT/scaling.json (and the report, report.py).

With MoE variants by expert count (`--experts`), one granular law is fitted over all their
runs (Krajewski et al.: L(N, D, G) = E + (A + g / G^gamma) / N^alpha + B / D^beta) and each
variant is that law at its granularity, with its own cost model; at a given compute the
variants are ranked by the loss each reaches compute-optimally, in FLOPs and on the clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import ConfigError
from .grid import COUNT, Grid, read_grid, read_rows, run_name
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


def _finite(rows: list[dict], names, where: str) -> list[dict]:
    ok = [r for r in rows if r["family"] in names and r.get("loss") is not None and math.isfinite(r["loss"])]
    if not ok:
        raise ConfigError(f"{where}: no run of this family finished with a finite loss (every one diverged)")
    return ok


def _cost(ok: list[dict], law: Law) -> Family:
    """The family's cost model: FLOPs per token against N, seconds per FLOP at its widest width."""
    u, v = fit_cost([r["params"][COUNT] for r in ok], [r["flops_per_token"] for r in ok])
    widest = max(r["width"] for r in ok)  # seconds per FLOP where the grid is nearest to a larger model
    spf = float(np.median([r["seconds"] / r["flops"] for r in ok if r["width"] == widest]))
    return Family(law, u, v, spf)


def fit_family(rows: list[dict], name: str, samples: int = SAMPLES) -> FamilyFit:
    """Fit one family's runs (those with a finite loss); ConfigError naming the family when it cannot be."""
    where = f"scaling fit ({name})"
    ok = _finite(rows, {name}, where)
    n = [r["params"][COUNT] for r in ok]
    d = [r["tokens"] for r in ok]
    loss = [r["loss"] for r in ok]
    law = fit_law(n, d, loss, where=where)
    boots = bootstrap(n, d, loss, law, samples=samples)
    return FamilyFit(name, ok, law, boots, _cost(ok, law))


@dataclass
class GranularFit:
    """The MoE variants' one law over granularity, its bootstrap laws, and each variant at its granularity; or,
    where the variants' losses do not follow the law (`note` says why), each variant fitted on its own."""

    law: Law | None
    boots: list[Law]
    variants: dict[str, FamilyFit]
    granularity: dict[str, float]
    note: str | None = None


def fit_variants(rows: list[dict], names: tuple[str, ...], samples: int = SAMPLES) -> GranularFit:
    """One granular law over the runs of the MoE variants `names`; each variant's FamilyFit is that law at the
    variant's granularity (its bootstrap laws likewise) with the variant's own cost model."""
    where = f"scaling fit ({', '.join(names)})"
    ok = _finite(rows, set(names), where)
    n = [r["params"][COUNT] for r in ok]
    d = [r["tokens"] for r in ok]
    loss = [r["loss"] for r in ok]
    gran = [r["granularity"] for r in ok]
    runs = {name: [r for r in ok if r["family"] == name] for name in names}
    for name, mine in runs.items():
        if not mine:
            raise ConfigError(f"scaling fit ({name}): no run of this family finished with a finite loss")
    level = {name: float(np.median([r["granularity"] for r in mine])) for name, mine in runs.items()}
    try:
        law = fit_law(n, d, loss, granularity=gran, where=where)
    except ConfigError as e:  # the variants still answer which is best, each by its own law
        note = f"{e}; each variant is fitted on its own"
        return GranularFit(None, [], {name: fit_family(rows, name, samples) for name in names}, level, note)
    boots = bootstrap(n, d, loss, law, granularity=gran, samples=samples)
    variants = {}
    for name, mine in runs.items():
        at = law.at(level[name])
        variants[name] = FamilyFit(name, mine, at, [b.at(level[name]) for b in boots], _cost(mine, at))
    return GranularFit(law, boots, variants, level)


def fit_families(
    rows: list[dict], grid: Grid, samples: int = SAMPLES
) -> tuple[dict[str, FamilyFit], GranularFit | None]:
    """Every family's fit (dense and the MoE, or each MoE variant from their one granular law)."""
    fits = {"dense": fit_family(rows, "dense", samples)}
    if not grid.experts:
        fits["moe"] = fit_family(rows, "moe", samples)
        return fits, None
    granular = fit_variants(rows, grid.families[1:], samples)
    return fits | granular.variants, granular


def leverage_at(dense: FamilyFit, moe: FamilyFit, c: float) -> dict:
    """EL at compute `c` in FLOPs and in seconds, each with its 95% bootstrap interval
    (bootstrap laws of the two families paired by index)."""
    k = min(len(dense.boots), len(moe.boots))
    flops = [leverage(dense.boot_family(i), moe.boot_family(i), c) for i in range(k)]
    clock = [clock_leverage(dense.boot_family(i), moe.boot_family(i), c) for i in range(k)]
    optimal = {f"{fam}_optimal": dict(zip(("n", "d", "loss"), fit.family.frontier(c), strict=True))
               for fam, fit in (("moe", moe), ("dense", dense))}  # fmt: skip
    return {
        "family": moe.name,
        "flops": c,
        "el": leverage(dense.family, moe.family, c),
        "el_interval": interval(flops),
        "el_clock": clock_leverage(dense.family, moe.family, c),
        "el_clock_interval": interval(clock),
        **optimal,
        "beyond_grid": max(
            (beyond(fit.rows, optimal[f"{fam}_optimal"]) for fam, fit in (("moe", moe), ("dense", dense))),
            key=lambda b: b["factor"],
        ),
    }


def beyond(rows: list[dict], point: dict) -> dict:
    """How far a frontier's (N, D) lies outside the span of a family's runs: the larger of its ratios to the
    nearest edge, in size and in tokens (1 inside), e.g. {'factor': 2.9, 'axis': 'tokens'}."""
    out: dict = {"factor": 1.0, "axis": None}
    for axis, key, values in (
        ("size", "n", [r["params"][COUNT] for r in rows]),
        ("tokens", "d", [r["tokens"] for r in rows]),
    ):
        v = point[key]
        factor = max(v / max(values), min(values) / v, 1.0)
        if factor > out["factor"]:
            out = {"factor": factor, "axis": axis}
    return out


def _x(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.3g}"


def _moe(family: str) -> str:
    return "the MoE" if family == "moe" else f"the MoE with {family[len('moe-e') :]} experts"


def sentence(el: dict, machine: str | None) -> str:
    """The line a user needs, e.g. 'at 1e+19 FLOPs the MoE matches a dense model trained on 2.30x
    [1.80, 2.90] its compute (1.60x [..] its seconds on this machine)'."""
    lo, hi = el["el_interval"]
    clo, chi = el["el_clock_interval"]
    where = f"on {machine}" if machine else "on this machine"
    moe = _moe(el.get("family", "moe"))
    if not math.isfinite(el["el"]):
        return (
            f"at {el['flops']:.1e} FLOPs {moe} reaches a loss ({el['moe_optimal']['loss']:.4f}) that the "
            "fitted dense law never reaches at any compute"
        )
    return (
        f"at {el['flops']:.1e} FLOPs {moe} matches a dense model trained on {_x(el['el'])}x [{_x(lo)}, {_x(hi)}] "
        f"its compute ({_x(el['el_clock'])}x [{_x(clo)}, {_x(chi)}] its training seconds {where}, "
        "each family's seconds per FLOP measured at its widest grid width)" + _beyond(el)
    )


def _beyond(el: dict) -> str:
    out = el.get("beyond_grid", {"factor": 1.0})
    if out["factor"] < 1.05:
        return ""
    return (
        f"; the compute-optimal runs at this compute lie up to {out['factor']:.2g}x outside the grid's "
        f"{'sizes' if out['axis'] == 'size' else 'token budgets'}: an extrapolation of the laws, not a measurement"
    )


def best_variant(fits: dict[str, FamilyFit], names: tuple[str, ...], c: float, *, clock: bool = False) -> dict:
    """The MoE variant that reaches the lowest compute-optimal loss at compute `c` (at the seconds `c` FLOPs take
    the reference variant, `names[0]`, when `clock`): each variant's loss, and the share of the paired bootstrap
    laws in which each is best."""

    def budget(name: str) -> float:  # equal seconds: each variant gets the FLOPs those seconds buy it
        return c * fits[names[0]].family.s_per_flop / fits[name].family.s_per_flop if clock else c

    frontier = {name: dict(zip(("n", "d", "loss"), fits[name].family.frontier(budget(name)), strict=True))
                for name in names}  # fmt: skip
    losses = {name: frontier[name]["loss"] for name in names}
    k = min(len(fits[name].boots) for name in names)
    wins = dict.fromkeys(names, 0)
    for i in range(k):
        boot = {name: fits[name].boot_family(i).frontier(budget(name))[2] for name in names}
        wins[min(boot, key=boot.get)] += 1  # type: ignore[arg-type]
    best = min(losses, key=losses.get)  # type: ignore[arg-type]
    far = max((beyond(fits[name].rows, frontier[name]) for name in names), key=lambda b: b["factor"])
    return {"flops": c, "clock": clock, "losses": losses, "best": best,
            "best_share": {name: wins[name] / max(1, k) for name in names}, "beyond_grid": far}  # fmt: skip


def best_sentence(b: dict, rows: list[dict], machine: str | None) -> str:
    """e.g. 'at 8.6e+12 FLOPs 16 experts (top-4) reach the lowest loss, 3.912 (8 experts: 3.925, ...); best in 81%
    of the bootstrap fits'."""
    shape = {r["family"]: f"{r['experts']} experts (top-{r['top_k']})" for r in rows if "experts" in r}
    others = ", ".join(f"{shape[n]}: {v:.4f}" for n, v in b["losses"].items() if n != b["best"])
    where = f"on {machine}" if machine else "on this machine"
    when = f"in the seconds {b['flops']:.1e} FLOPs take {shape[next(iter(b['losses']))]} {where}" if b["clock"] \
        else f"at {b['flops']:.1e} FLOPs"  # fmt: skip
    return (
        f"{when}, {shape[b['best']]} reach the lowest compute-optimal loss, {b['losses'][b['best']]:.4f} ({others}); "
        f"best in {100 * b['best_share'][b['best']]:.0f}% of the bootstrap fits" + _beyond(b)
    )


def _law_dict(law: Law, boots: list[Law], keys=("E", "A", "alpha", "B", "beta")) -> dict:
    return law.as_dict() | {
        "intervals": {k: interval([getattr(b, k) for b in boots]) for k in keys},
        "bootstrap_fits": len(boots),
    }


def fit_scaling(out, samples: int = SAMPLES) -> dict:
    """Fit a finished scaling folder: laws, intervals, EL at the grid's largest compute and two
    decades above it, and over a range for the plot (per MoE family; with variants, which is
    best). Returns the summary (written by the report)."""
    grid = read_grid(out)
    rows = finished_rows(out, grid)
    fits, granular = fit_families(rows, grid, samples)
    dense, moes = fits["dense"], grid.families[1:]
    c_max = max(r["flops"] for r in rows if r.get("flops"))
    c_min = min(r["flops"] for r in rows if r.get("flops"))
    points = [leverage_at(dense, fits[m], c) for m in moes for c in (c_max, c_max * 100)]
    curve = [leverage_at(dense, fits[m], float(c)) for m in moes for c in np.geomspace(c_min, c_max * 1e4, 17)]
    machines = {r.get("machine") for r in rows} - {None}
    machine = machines.pop() if len(machines) == 1 else None
    laws = {}
    for name, f in fits.items():
        laws[name] = _law_dict(f.law, f.boots) | {
            "flops_per_token": {"u": f.family.u, "v": f.family.v},
            "seconds_per_flop": f.family.s_per_flop,
        }
    summary: dict = {
        "grid": {
            "widths": list(grid.widths),
            "tokens": list(grid.tokens),
            "seeds": grid.seeds,
            "experts": list(grid.experts),
        },  # fmt: skip
        "count": COUNT,
        "laws": laws,
        "leverage": points,
        "leverage_curve": curve,
        "sentences": [sentence(p, machine) for p in points],
        "machine": machine,
        "runs": rows,
    }
    if granular is not None:
        keys = ("E", "A", "alpha", "B", "beta", "g", "gamma")
        if granular.law is not None:
            summary["granular_law"] = _law_dict(granular.law, granular.boots, keys)
        if granular.note:
            summary["notes"] = [granular.note]
        summary["granularity"] = granular.granularity
        summary["best"] = [best_variant(fits, moes, c, clock=t) for c in (c_max, c_max * 100) for t in (False, True)]
        summary["sentences"] += [best_sentence(b, rows, machine) for b in summary["best"]]
    return summary


def predict(law: Law, boots: list[Law], n: float, d: float) -> tuple[float, list[float]]:
    """The law's loss at (N, D) and its 95% bootstrap interval."""
    return float(law.loss(n, d)), interval([float(b.loss(n, d)) for b in boots])
