"""A verdict that survives seeds: each recipe trained with N seeds (model init and data
order), and the difference of final validation losses judged by its 95% interval,
paired by seed - "ahead", "behind" or "not distinguishable at this budget", never from
one run.

The interval is Student's t over the N per-seed differences (other - reference):
mean +- t(0.975, N-1) * sd / sqrt(N). With 2 seeds t is 12.7: only a difference much
larger than its seed-to-seed wobble gets a verdict, which is the point.
"""

from __future__ import annotations

import math
import statistics

# t(0.975, df) for df = 1..30; past 30 the normal's 1.96 is within 2%
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
SEED_SUFFIX = "-seed"


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    return T975[df - 1] if df <= len(T975) else 1.96


def paired_interval(ref: list[float], other: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of other - ref over paired seeds, a 95% interval (needs 2 or more)."""
    if len(ref) != len(other) or len(ref) < 2:
        raise ValueError(f"paired seeds: expected two or more pairs, got {len(ref)} and {len(other)}")
    return mean_interval([b - a for a, b in zip(ref, other, strict=True)])


def mean_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of 2 or more values with its 95% interval (Student's t)."""
    mean = statistics.fmean(xs)
    half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """Lower loss is better: the other recipe is ahead when the whole interval is below zero."""
    if high < 0:
        return "ahead"
    if low > 0:
        return "behind"
    return "not distinguishable at this budget"


def recipe_of(run_name: str) -> str:
    """'tiny-moe-seed1' -> 'tiny-moe'."""
    head, sep, tail = run_name.rpartition(SEED_SUFFIX)
    return head if sep and tail.isdigit() else run_name


def seed_verdicts(final: dict[str, float], reference: str) -> dict[str, dict]:
    """For every recipe other than `reference` trained with the same seeds: its per-seed
    final losses, the reference's, the paired interval of the difference and the verdict,
    with the sentence that says it. `final`: run name -> final validation loss."""
    groups: dict[str, dict[int, float]] = {}
    for name, loss in final.items():
        seed = name.rpartition(SEED_SUFFIX)[2]
        if recipe_of(name) != name:
            groups.setdefault(recipe_of(name), {})[int(seed)] = loss
    ref = groups.get(reference, {})
    out = {}
    for recipe, by_seed in groups.items():
        seeds = sorted(set(by_seed) & set(ref))
        if recipe == reference or len(seeds) < 2:
            continue
        a, b = [ref[s] for s in seeds], [by_seed[s] for s in seeds]
        mean, low, high = paired_interval(a, b)
        v = verdict(low, high)
        text = (
            f"{recipe} vs {reference} over {len(seeds)} seeds: final validation loss {statistics.fmean(b):.4f} vs "
            f"{statistics.fmean(a):.4f}, difference {mean:+.4f} nats/token, 95% interval [{low:+.4f}, {high:+.4f}] "
            f"(paired by seed): {v}."
        )
        out[recipe] = {"seeds": seeds, "reference": a, "other": b, "mean": mean, "interval": [low, high],
                       "verdict": v, "text": text}  # fmt: skip
    return out


def speedup_interval(ups: list[float | None]) -> dict:
    """The per-seed token speed-ups to the reference's final loss (None: not reached), with
    the 95% interval of their mean when every seed reached it, and a clause saying so."""
    if any(u is None for u in ups) or len(ups) < 2:
        return {"tokens_speedup": ups, "speedup_text": "not every seed reached the reference's final loss"}
    vals = [float(u) for u in ups if u is not None]
    mean, low, high = mean_interval(vals)
    return {
        "tokens_speedup": vals,
        "tokens_speedup_interval": [low, high],
        "speedup_text": f"tokens to the reference's final loss: {mean:.2f}x fewer, 95% interval "
        f"[{low:.2f}, {high:.2f}]",
    }


def clock_verdict(pairs: list[dict], recipe: str, reference: str, context: str) -> dict:
    """The verdict on the clock from each seed's `compare.speedups` (reference, other): the held-out loss at equal
    training seconds, paired by seed, with its 95% interval and verdict, and the training seconds to the reference's
    final loss as a ratio of the reference's, with its interval when every seed reached it."""
    diffs = [
        p["val_loss_at_equal_seconds"] - p["ref_val_loss_at_equal_seconds"]
        for p in pairs
        if p["val_loss_at_equal_seconds"] is not None and p["ref_val_loss_at_equal_seconds"] is not None
    ]
    out: dict = {"equal_seconds_diff": diffs, "seconds_ratio": [p["seconds_ratio"] for p in pairs]}
    if len(diffs) == len(pairs) >= 2:
        mean, low, high = mean_interval(diffs)
        out |= {"mean": mean, "interval": [low, high], "verdict": verdict(low, high)}
        loss = f"held-out loss at equal training seconds {mean:+.4f} nats/token, 95% interval [{low:+.4f}, {high:+.4f}]"
        loss += f" (paired by seed): {out['verdict']}"
    else:
        loss = "no common training-seconds point in every seed"
    ratios = out["seconds_ratio"]
    if len(ratios) >= 2 and all(r is not None for r in ratios):
        mean, low, high = mean_interval([float(r) for r in ratios])
        out["seconds_ratio_interval"] = [low, high]
        reach = (
            f"training seconds to {reference}'s final loss {mean:.2f}x {reference}'s, 95% interval "
            f"[{low:.2f}, {high:.2f}]"
        )
    else:
        reach = f"not every seed reached {reference}'s final loss"
    out["text"] = f"On the clock ({context}): {recipe}'s {loss}; {reach}."
    return out
