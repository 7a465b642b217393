"""`moelab compare`: train (or read) several runs on the same data and budget, and say
what the MoE cost and what it bought, from the stored curves.

The curves and what one run takes to reach another's loss (tokens, FLOPs, training
seconds) are analysis.curves'; this module trains or reads the runs, profiles them and
writes the report.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ...config import ConfigError
from ...data.sources import check_source
from ...run_config import load_config
from ...runtime import PARENT_ENV
from ...serve.bench import bench_runs
from ...store.outputs import staged_output
from ..memory.plan import plan_memory
from ..memory.setup import MemorySetup
from ..profile.report import imbalance, moe_overhead, profile_runs
from ..profile.timing import ROWS
from .curves import RunCurves, clock_context, head_to_head, read_run, speedups, x_to_reach, y_at
from .report import write_report
from .seeds import SEED_SUFFIX, clock_verdict, recipe_of, seed_verdicts, speedup_interval

__all__ = ["RunCurves", "compare", "read_run", "speedups", "x_to_reach", "y_at"]  # the curves' names, as before


def run_summary(rc: RunCurves, run_dir: Path | None) -> dict:
    """One run's entry of summary.json: name, final validation loss, tokens/s, peak memory, parameter counts and planned
    weight/gradient/optimizer bytes."""

    pc = rc.cfg.model.param_counts()
    tps = [r["tokens_per_s"] for r in rc.records if r.get("tokens_per_s")]
    setup = MemorySetup(micro_batch=rc.cfg.train.batch_size, seq_len=rc.cfg.data.seq_len)
    plan = plan_memory(rc.cfg.model, setup, optim=rc.cfg.optim)
    last_moe = rc.records[-1].get("moe_layers", [])
    return {
        "name": rc.name,
        "run_dir": str(run_dir) if run_dir else None,
        "final_val_loss": rc.val_loss[-1],
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "peak_mem_bytes": max(r.get("peak_mem_bytes", 0) for r in rc.records),
        "peak_mem_kind": "process peak RSS (CPU)" if rc.cfg.train.device in ("cpu", "auto") else "device",
        "tensor_bytes": {k: plan.bytes[k] for k in ("params", "grads", "optimizer")},
        "planned_bytes": {k: plan.bytes[k] for k in ("params", "grads", "optimizer", "activations")},
        # measured: the training state and step (allocator peak on CUDA; resident growth
        # from model build on CPU), not the whole process, whose peak data preparation sets
        "train_mem_bytes": max((r["train_mem_bytes"] for r in rc.records if "train_mem_bytes" in r), default=None),
        "params_total": pc["total"],
        "params_active": pc["active"],
        "tokens": rc.tokens[-1],
        "flops": rc.flops[-1],
        "seconds": rc.seconds[-1],
        "loss_spikes": rc.records[-1].get("loss_spikes", 0),
        "final_max_violation": [m["max_violation"] for m in last_moe],
        "dead_experts": [m["dead_experts"] for m in last_moe],
        "final_expert_load": [m["load"] for m in last_moe],
    }


def describe(ref: dict, other: dict, sp: dict, overhead: dict | None = None) -> str:
    """Plain words from the numbers: what the MoE cost and what it bought. `overhead`: `moe_overhead` of the other
    run's profile against the reference's (points by phase, the rounds' spread, whether a figure may be stated)."""
    time_points = overhead["points"] if overhead else None
    a, b = ref["name"], other["name"]
    parts = [
        f"{b} holds {other['params_total'] / ref['params_total']:.2f}x the parameters of {a} "
        f"({other['params_total'] / 1e6:.1f} M vs {ref['params_total'] / 1e6:.1f} M) with "
        f"{other['params_active'] / ref['params_active']:.2f}x the active parameters per token."
    ]
    if ref["tokens_per_s"] and other["tokens_per_s"]:
        parts.append(
            f"It trained at {other['tokens_per_s'] / ref['tokens_per_s']:.2f}x the tokens/s "
            f"({other['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f})."
        )
    if overhead and not overhead.get("reliable", True):
        s = overhead["spread_percent"]
        parts.append(
            f"Profiled, its step ({other['step_ms']:.1f} ms) and {ref['name']}'s ({ref['step_ms']:.1f} ms) cannot be "
            f"told apart here: their timing rounds disagree by up to {s:.0f}%, so no percentage is stated."
        )
    elif other.get("step_ms") and ref.get("step_ms") and time_points:
        d = (other["step_ms"] - ref["step_ms"]) / ref["step_ms"] * 100
        big = sorted(time_points.items(), key=lambda kv: -abs(kv[1]))
        shown = ", ".join(f"{k} {v:+.1f}" for k, v in big if abs(v) >= 0.5) or "no phase above half a point"
        parts.append(
            f"Profiled, its step took {abs(d):.0f}% {'more' if d >= 0 else 'less'} time than {ref['name']}'s "
            f"(points of {ref['name']}'s step: {shown})"
            + (f"; {other['imbalance']['text']}." if other.get("imbalance") else ".")
        )
    tb_ref, tb = sum(ref["tensor_bytes"].values()), sum(other["tensor_bytes"].values())
    mem = (
        f"; training measured {other['train_mem_bytes'] / 2**20:,.0f} MiB vs {ref['train_mem_bytes'] / 2**20:,.0f} MiB "
        f"({other['train_mem_bytes'] / max(ref['train_mem_bytes'], 1):.2f}x: state and activations, "
        "data preparation excluded)"
        if other.get("train_mem_bytes") and ref.get("train_mem_bytes")
        else ""
    )
    parts.append(
        f"Weights, gradients and optimizer state take {tb / tb_ref:.2f}x the bytes "
        f"({tb / 2**20:,.0f} MiB vs {tb_ref / 2**20:,.0f} MiB){mem}."
    )
    if sp["val_loss_at_equal_flops"] is not None:
        d = sp["val_loss_at_equal_flops"] - ref["final_val_loss"]
        parts.append(
            f"At {a}'s final training FLOPs its validation loss was {sp['val_loss_at_equal_flops']:.3f} "
            f"vs {ref['final_val_loss']:.3f} ({'better' if d < 0 else 'worse'} by {abs(d):.3f} nats/token)."
        )
    if sp["reached"]:

        def ratio(x: float | None, what: str) -> str:
            if not x:
                return f"(no {what} figure)"
            return f"{x:.2f}x fewer {what}" if x >= 1 else f"{1 / x:.2f}x more {what}"

        parts.append(
            f"It reached {a}'s final loss with {ratio(sp['tokens_speedup'], 'tokens')}, "
            f"{ratio(sp['flops_speedup'], 'FLOPs')} and {ratio(sp['seconds_speedup'], 'seconds of training')}."
        )
    else:
        parts.append(
            f"It did not reach {a}'s final loss ({ref['final_val_loss']:.3f}) within the budget "
            f"(its final: {other['final_val_loss']:.3f})."
        )
    paid = other["final_val_loss"] < ref["final_val_loss"]
    parts.append(
        f"So at this budget {b} has {'' if paid else 'not yet '}paid for its extra memory: {tb / tb_ref:.2f}x the "
        f"training-state bytes for a final validation loss {abs(other['final_val_loss'] - ref['final_val_loss']):.3f} "
        f"nats/token {'lower' if paid else 'higher'} than {a}'s."
    )
    if other["final_max_violation"]:
        mv = max(other["final_max_violation"])
        parts.append(
            f"Routing: worst layer max-violation {mv:.2f} at the end (0 = perfectly balanced), "
            f"{sum(other['dead_experts'])} dead experts, {other['loss_spikes']} loss spikes."
        )
    return " ".join(parts)


def compare(
    items: list[str],
    data: str | None,
    out: Path,
    steps: int | None = None,
    tokens: int | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    seeds: int = 1,
    jobs: int = 1,
) -> dict:
    """Train each recipe (with `seeds` seeds: train.seed=0..N-1, runs NAME-seedS; `jobs` of
    them side by side) or read each finished run folder, and write the report into OUT,
    which appears only when everything succeeded (staged); an existing OUT is replaced
    only with `overwrite`, and never when it holds one of the runs or the data."""
    out = Path(out)
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps: expected a positive number of steps, got {steps}")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens: expected a positive token budget, got {tokens}")
    if seeds < 1:
        raise ConfigError(f"--seeds: expected a positive number of seeds, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive number of trainings at once, got {jobs}")
    finished = [i for i in items if Path(i).is_dir() and (Path(i) / "metrics.jsonl").exists()]
    if len(finished) == len(items):  # nothing to train: a training flag would be ignored without a word
        given = [f for f, on in (("--seeds", seeds > 1), ("--steps", steps is not None),
                                 ("--tokens", tokens is not None), ("--jobs", jobs > 1)) if on]  # fmt: skip
        if given:
            raise ConfigError(
                f"{given[0]}: every item is a finished run, read as it is; {given[0]} applies to recipes compare trains"
            )
    if data is not None and data != "stdlib":
        check_source(data)  # before any training process starts
    with staged_output(out, overwrite=overwrite, protect=[*items, data], kind="compare") as tmp:
        try:
            return _compare_into(tmp, out, items, data, steps, tokens, overrides, quiet, seeds, jobs)
        except BaseException:
            _keep_trained(tmp, out)
            raise


def _keep_trained(tmp: Path, out: Path) -> None:
    """A compare that fails after some training (in a later run, in its report) keeps the runs it trained beside
    OUT, where the failed staging folder would have taken hours of training with it."""
    runs = tmp / "runs"
    trained = sorted(runs.iterdir()) if runs.is_dir() else []
    if not trained:
        return
    kept, i = tmp.parent / f"{out.name}.runs", 1
    while kept.exists():
        kept, i = tmp.parent / f"{out.name}.runs-{i}", i + 1
    os.rename(runs, kept)
    print(f"compare: stopped after training {len(trained)} run(s); they are kept in {kept} "
          f"(`moelab compare {kept}/*` reads the finished ones; `moelab train RECIPE --out RUN --resume` "
          "continues an unfinished one)", file=sys.stderr)  # fmt: skip


# '+' starts an override only where a dotted key and '=' follow: a value may hold a '+' of its own (1e+3)
_OWN_OVERRIDE = re.compile(r"\+(?=[A-Za-z_][\w.]*=)")


def split_item(item: str) -> tuple[str, list[str]]:
    """RECIPE+KEY=VALUE[+KEY=VALUE...]: the recipe and the overrides of its own (applied after those every recipe
    gets), so one compare sets an option against its default: `tiny-moe tiny-moe+optim.muon_experts=dion`. An
    existing path is taken whole."""
    if Path(item).exists():
        return item, []
    recipe, *own = _OWN_OVERRIDE.split(item)
    return recipe, own


def _own_name(recipe_name: str, own: list[str]) -> list[str]:
    """A recipe given overrides of its own runs under a name that says them (`tiny-moe+optim.lr=0.001`), unless the
    overrides name it: two runs of one recipe would otherwise share a name and a folder."""
    if not own or any(o.split("=", 1)[0].strip() == "name" for o in own):
        return []
    return ["name=" + "+".join([recipe_name, *own]).replace(os.sep, "_")]


def _train_command(
    item: str, run_dir: Path, steps: int, data: str | None, quiet: bool, overrides: list[str] | None, seed: int | None
) -> list[str]:
    """The command that trains recipe `item` into `run_dir` in a process of its own (peak
    memory, RSS on CPU, and speed are then the run's own); `seed` sets train.seed."""
    cmd = [sys.executable, "-m", "moelab", "train", item, "--out", str(run_dir), "--steps", str(steps), "--overwrite"]
    cmd += [*(["--data", data] if data else []), *(["--quiet"] if quiet else []), *(overrides or [])]
    return cmd + ([f"train.seed={seed}"] if seed is not None else [])


def _run_all(cmds: list[tuple[str, list[str]]], jobs: int) -> list[tuple[float, float]]:
    """Run the (recipe, training command) pairs, `jobs` at a time, in order, the next one starting as soon as any
    running one ends (a finished run's core never idles while a slower one holds the head of the queue).
    Returns each command's (start, end) on the monotonic clock; ConfigError naming the first that failed."""
    running: list[tuple[int, subprocess.Popen]] = []
    spans = [(0.0, 0.0)] * len(cmds)
    pending = list(range(len(cmds)))
    failed: list[int] = []
    while pending or running:
        while pending and len(running) < jobs and not failed:
            i = pending.pop(0)
            env = {**os.environ, PARENT_ENV: str(os.getpid())}  # each training ends if this command is killed
            running.append((i, subprocess.Popen(cmds[i][1], env=env)))
            spans[i] = (time.monotonic(), 0.0)
        done = [(i, proc) for i, proc in running if proc.poll() is not None]
        if not done:
            time.sleep(0.2)
            continue
        for i, proc in done:
            running.remove((i, proc))
            spans[i] = (spans[i][0], time.monotonic())
            if proc.returncode != 0:
                failed.append(i)
        if failed and not running:
            break
    if failed:
        item, cmd = cmds[failed[0]]
        raise ConfigError(f"compare: training {item} failed (command: {' '.join(cmd)})")
    return spans


def short_handed(spans: list[tuple[float, float]], jobs: int) -> list[float]:
    """For each (start, end) span, the share of it during which fewer than `jobs` of the spans ran (itself
    included): the time a run trained without its full set of neighbours, and so faster than its neighbours'
    share of the machine would let it."""
    edges = sorted({t for span in spans for t in span})
    out = []
    for s, e in spans:
        short = 0.0
        for a, b in itertools.pairwise(edges):
            if s <= a and b <= e and sum(s2 <= a and b <= e2 for s2, e2 in spans) < jobs:
                short += b - a
        out.append(short / (e - s) if e > s else 0.0)
    return out


def _job_overrides(overrides: list[str] | None, jobs: int) -> list[str]:
    """With `jobs` trainings side by side, each gets an equal share of this process's cores
    (unless train.threads is set): more threads than cores slow every run several times."""
    out = list(overrides or [])
    if jobs > 1 and not any(o.startswith("train.threads=") for o in out):
        out.append(f"train.threads={max(1, len(os.sched_getaffinity(0)) // jobs)}")
    return out


def _compare_into(
    tmp: Path,
    out: Path,
    items: list[str],
    data: str | None,
    steps: int | None,
    tokens: int | None,
    overrides: list[str] | None,
    quiet: bool,
    seeds: int = 1,
    jobs: int = 1,
) -> dict:
    """compare's work, written into the staging folder `tmp` that becomes `out`."""

    here: list[Path] = []  # where each run is now (a trained one: in the staging folder)
    names: list[str | None] = []  # None: a finished run read as it is
    dirs: list[Path] = []
    cmds = []
    train_overrides = _job_overrides(overrides, jobs)
    for item in items:
        p = Path(item)
        if p.is_dir() and (p / "metrics.jsonl").exists():
            here.append(p)
            names.append(None)
            dirs.append(p)
            continue
        recipe, own = split_item(item)
        own += _own_name(load_config(recipe, overrides).name, own)
        cfg = load_config(recipe, [*(overrides or []), *own])
        if tokens is not None:
            steps_i = max(1, tokens // (cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len))
        else:
            steps_i = steps or cfg.train.steps
        for seed in range(seeds) if seeds > 1 else [None]:
            name = cfg.name if seed is None else f"{cfg.name}{SEED_SUFFIX}{seed}"
            here.append(tmp / "runs" / name)
            names.append(name)
            dirs.append(out / "runs" / name)  # where it will be once the output is in place
            cmd = _train_command(recipe, here[-1], steps_i, data, quiet or jobs > 1, [*train_overrides, *own], seed)
            cmds.append((seed or 0, item, cmd))
    # seed by seed, so the recipes a verdict pairs train beside each other, not beside themselves
    queue = sorted(cmds, key=lambda c: c[0])
    spans = _run_all([(item, cmd) for _, item, cmd in queue], jobs)
    alone = {Path(cmd[cmd.index("--out") + 1]).name: share for (_, _, cmd), share in
             zip(queue, short_handed(spans, jobs), strict=True)}  # fmt: skip
    curves = [read_run(h, n) if n is not None else read_run(h) for h, n in zip(here, names, strict=True)]
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: run names must differ, got {names}")
    final = {c.name: c.val_loss[-1] for c in curves}
    ref_i = next((i for i, c in enumerate(curves) if not c.is_moe), 0)
    runs = [run_summary(c, d) for c, d in zip(curves, dirs, strict=True)]
    # where each run's step time goes: a short profile of its last checkpoint, here
    times = profile_runs(here)
    for r, (table, forced) in zip(runs, times, strict=True):
        if jobs > 1 and r["name"] in alone:
            r["short_handed_share"] = alone[r["name"]]
        r["step_ms"] = table.plain_ms
        r["time_ms"] = {row: table.row_ms(row) for row in ROWS if table.row_ms(row) > 0}
        if forced is not None:
            r["imbalance"] = imbalance(table, forced)
    ref = runs[ref_i]
    speed = {c.name: speedups(curves[ref_i], c) for i, c in enumerate(curves) if i != ref_i}
    if not cmds:
        trained = "read from finished runs: whether they trained side by side is not recorded"
    elif len(cmds) < len(curves):
        trained = "some trained here, some read from finished runs: not all trained side by side"
    elif jobs > 1:
        threads = next(o for o in train_overrides if o.startswith("train.threads="))
        trained = f"trained here side by side, {jobs} at a time, {threads}"
        short = [f"{name} {share:.0%}" for name, share in alone.items() if share >= 0.05]
        if short:  # the queue's tail: a run alone on the machine trains faster than its neighbours did
            trained += f" (with fewer than {jobs} trainings running for part of their time: {', '.join(short)})"
    else:
        trained = "trained here one after another"
    context = clock_context(curves, trained)
    text = [
        head_to_head(curves[ref_i], c, speed[c.name], context)
        + " "
        + describe(ref, runs[i], speed[c.name], moe_overhead(times[i][0], times[ref_i][0]))
        for i, c in enumerate(curves)
        if c.name in speed
    ]
    verdicts = seed_verdicts(final, recipe_of(ref["name"]))
    by_name = {c.name: c for c in curves}
    for recipe, v in verdicts.items():  # the speed-up to the reference's loss, seed by seed, with its interval
        pair = [
            (by_name[f"{recipe_of(ref['name'])}{SEED_SUFFIX}{s}"], by_name[f"{recipe}{SEED_SUFFIX}{s}"])
            for s in v["seeds"]
        ]
        v |= speedup_interval([speedups(a, b)["tokens_speedup"] for a, b in pair])
        v["text"] = v["text"][:-1] + f"; {v['speedup_text']}."
        v["clock"] = clock_verdict([speedups(a, b) for a, b in pair], recipe, recipe_of(ref["name"]), context)
        v["text"] += " " + v["clock"]["text"]
    # serving: each recipe's first run decoding with the KV cache, beside the first MoE's dense total twin
    first: dict[str, Path] = {}
    for c, h in zip(curves, here, strict=True):
        first.setdefault(recipe_of(c.name), h)
    inference = bench_runs(list(first.items()))
    summary = {"reference": ref["name"], "runs": runs, "speedup": speed, "summary": text, "clock_context": context,
               "inference": inference}  # fmt: skip
    if verdicts:  # first: the one statement that holds across seeds
        summary |= {"seeds": verdicts, "summary": [v["text"] for v in verdicts.values()] + text}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(tmp, curves, summary)
    return summary
