"""`moelab scaling --experts`: granularity as a variable. Krajewski's law L(N, D, G) is
recovered from noisy synthetic runs and ranks the variants as the truth does, granularity
that follows no power is fitted per variant (said), and the command trains variants at equal
active and total parameters end to end."""

import json
import math

import numpy as np
import pytest

from conftest import grid_args, run_cli
from moelab.analysis.studies.scaling.fit import best_variant, fit_family, fit_variants
from moelab.analysis.studies.scaling.law import fit_law, interval
from moelab.errors import ConfigError

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}  # Hoffmann et al.'s fitted law
GRANULAR = dict(TRUE, A=300.0, g=200.0, gamma=0.58)  # Krajewski et al.'s gamma; g / G^gamma is 40% of the size term


def variant_rows(law: dict, seed: int, noise: float = 0.005, shift=lambda g: 0.0) -> list[dict]:
    """Scaling rows of three MoE variants (granularity 1, 2, 4) x 4 sizes x 3 budgets drawn from a granular law with
    multiplicative noise (plus `shift(G)`), each with the same cost model (6N FLOPs per token, 1 ns per FLOP)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(np.geomspace(1e5, 1e7, 4)):
        for d in np.geomspace(1e7, 1e9, 3):
            for g in (1.0, 2.0, 4.0):
                size = law["A"] + law["g"] / g ** law["gamma"]
                loss = (law["E"] + size / n ** law["alpha"] + law["B"] / d ** law["beta"] + shift(g))
                loss *= math.exp(rng.normal(0, noise))
                rows.append({"family": f"moe-e{int(4 * g)}", "width": 32 * (i + 1),
                             "params": {"active_non_embedding": n}, "tokens": d, "granularity": g,
                             "flops_per_token": 6 * n, "flops": 6 * n * d, "seconds": 6e-9 * n * d,
                             "loss": loss})  # fmt: skip
    return rows


VARIANTS = ("moe-e4", "moe-e8", "moe-e16")


def test_the_granular_law_is_recovered_and_ranks_the_variants():
    """Krajewski's L(N, D, G) from noisy synthetic runs of three variants: its exponents (gamma included) inside
    their intervals, each variant the law at its granularity, and the finest variant best at every compute when
    gamma > 0 - the coarsest when finer experts are worse (gamma < 0)."""
    rows = variant_rows(GRANULAR, seed=4)
    fit = fit_variants(rows, VARIANTS, samples=60)
    assert fit.law is not None and fit.note is None and len(fit.boots) > 45
    for k in ("alpha", "beta", "gamma", "g"):
        lo, hi = interval([getattr(b, k) for b in fit.boots])
        assert lo <= GRANULAR[k] <= hi, (k, lo, GRANULAR[k], hi)
    assert abs(fit.law.gamma - 0.58) < 0.2
    for name, g in zip(VARIANTS, (1.0, 2.0, 4.0), strict=True):
        assert fit.granularity[name] == g
        assert float(fit.variants[name].law.loss(3e6, 3e8)) == pytest.approx(float(fit.law.loss(3e6, 3e8, g)))
    for c in (1e15, 1e18):
        best = best_variant(fit.variants, VARIANTS, c)
        assert best["best"] == "moe-e16" and best["best_share"]["moe-e16"] > 0.9, best
        assert best["losses"]["moe-e4"] > best["losses"]["moe-e8"] > best["losses"]["moe-e16"]
    worse = variant_rows(dict(GRANULAR, g=150.0, gamma=-0.5), seed=5)
    fit = fit_variants(worse, VARIANTS, samples=30)
    assert fit.law is not None and fit.law.gamma < 0
    assert best_variant(fit.variants, VARIANTS, 1e16)["best"] == "moe-e4"
    # on the clock, in the seconds 1e16 FLOPs take the first variant: one twice as fast per FLOP gets twice the FLOPs
    fast = [dict(r, seconds=r["seconds"] / 2) if r["family"] == "moe-e16" else r for r in worse]
    fit = fit_variants(fast, VARIANTS, samples=30)
    clock = best_variant(fit.variants, VARIANTS, 1e16, clock=True)
    assert clock["losses"]["moe-e16"] == pytest.approx(fit.variants["moe-e16"].family.frontier(2e16)[2])
    assert clock["losses"]["moe-e4"] == pytest.approx(fit.variants["moe-e4"].family.frontier(1e16)[2])


def test_granularity_that_follows_no_power_fits_each_variant_alone():
    """Losses that rise with granularity faster than any power the law allows: the granular fit is refused with
    one line naming gamma, and the variants are fitted on their own, saying so."""
    rows = variant_rows(dict(GRANULAR, g=0.0, gamma=0.0), seed=6, noise=0.0, shift=lambda g: 0.002 * g**5)
    with pytest.raises(ConfigError, match="gamma ended at its bound"):
        fit_law([r["params"]["active_non_embedding"] for r in rows], [r["tokens"] for r in rows],
                [r["loss"] for r in rows], granularity=[r["granularity"] for r in rows])  # fmt: skip
    fit = fit_variants(rows, VARIANTS, samples=20)
    assert fit.law is None and "each variant is fitted on its own" in fit.note and "gamma" in fit.note
    alone = fit_family(rows, "moe-e16", samples=20)
    assert fit.variants["moe-e16"].law.A == pytest.approx(alone.law.A)


def test_experts_as_a_variable_end_to_end(tmp_path, prose):
    """`--experts 4,16`: one MoE family per expert count at the recipe's active and total parameters (top-k and
    expert width scaled), a law over granularity or - where the runs do not follow one - a law per variant, said;
    the best variant named at the grid's compute, in FLOPs and on the clock; a resumed grid with other expert counts
    refused."""
    out = tmp_path / "granular"
    args = [*grid_args(prose, out, tokens="8192,16384"), "--experts", "4,16", "--jobs", "2"]
    _, stdout, _ = run_cli(*args)
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted({r["family"] for r in rows}) == ["dense", "moe-e16", "moe-e4"] and len(rows) == 12
    for width in (32, 64):
        e4, e16 = (next(r for r in rows if r["family"] == f and r["width"] == width and r["tokens_budget"] == 8192)
                   for f in ("moe-e4", "moe-e16"))  # fmt: skip
        assert (e4["experts"], e4["top_k"], e16["experts"], e16["top_k"]) == (4, 1, 16, 4)
        assert e16["granularity"] == 4 * e4["granularity"]
        layers = e4["n_layers"]  # the routers differ (d_model x E each); the experts' parameters do not
        router = width * (16 - 4) * layers
        assert e16["params"]["total"] - e4["params"]["total"] == router
        assert e16["params"]["active_non_embedding"] - e4["params"]["active_non_embedding"] == router
    summary = json.loads((out / "scaling.json").read_text())
    assert list(summary["laws"]) == ["dense", "moe-e4", "moe-e16"]
    assert {p["family"] for p in summary["leverage"]} == {"moe-e4", "moe-e16"}
    if "granular_law" in summary:  # each variant is the one law at its granularity
        g = summary["granular_law"]
        for fam in ("moe-e4", "moe-e16"):
            size = g["A"] + g["g"] / summary["granularity"][fam] ** g["gamma"]
            assert summary["laws"][fam]["A"] == pytest.approx(size)
        assert "gamma fixed at 0.58" in " ".join(g["fixed"].values())  # two granularities cannot determine it
    else:
        assert "each variant is fitted on its own" in summary["notes"][0] and summary["notes"][0] in stdout
    assert len(summary["best"]) == 4 and all(b["best"] in ("moe-e4", "moe-e16") for b in summary["best"])
    assert stdout.count("reach the lowest compute-optimal loss") == 4
    assert (out / "report.html").is_file()
    rc, _, err = run_cli(*[a if a != "4,16" else "4,8" for a in args], check=False)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "experts" in err, err


def test_expert_counts_that_cannot_be_compared_are_refused_before_training(tmp_path, prose):
    for given, says in (("8", "two or more distinct expert counts"), ("3,8", "--experts 3: the recipe's 8 experts")):
        out = tmp_path / given.replace(",", "_")
        rc, _, err = run_cli(*grid_args(prose, out), "--experts", given, check=False)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err
        assert not out.exists()
