"""Commands that train, evaluate, size and inspect one model: train, eval, memory, profile, experts, demo.

Each imports what it needs inside its function, on purpose: `moelab --help`, a bad flag
or a refused output answer without importing torch (seconds on a small machine)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import Positional, arg

from ..run_config import Schedule
from .args import Fresh, Json, Overrides, Recipe, Run, positive, require


def cmd_train(
    recipe: Recipe,
    out: str,
    overrides: Overrides = (),
    data: str | None = None,
    steps: int | None = None,
    stop_after: int | None = None,
    resume: Annotated[bool, Fresh] = False,
    overwrite: Annotated[bool, Fresh] = False,
    init: str | None = None,
    quiet: bool = False,
):
    """Train a model from a named recipe or a YAML file.

    Args:
        recipe: named recipe (tiny-dense, tiny-moe, small-dense, small-moe) or a YAML file
        out: run folder
        overrides: dotted config overrides, e.g. model.moe.n_experts=16 (also after the options)
        data: stdlib, a text file, a folder, a .jsonl, a .parquet or a tokenized dataset; unset: the recipe's
        steps: total run length (the LR schedule's horizon)
        stop_after: end this invocation after K steps, with a checkpoint
        resume: continue the run in --out from its last checkpoint
        overwrite: replace --out (kept aside until the new run's first checkpoint)
        init: initialise weights from a run or checkpoint
        quiet: no progress bar
    """
    from ..run_config import load_config, read_config
    from ..runtime import exit_with_parent
    from ..train import train

    exit_with_parent()
    positive(steps=steps, stop_after=stop_after)
    cfg = load_config(recipe, list(overrides))
    if data is not None:
        cfg.data.source = data
    elif resume and (Path(out) / "config.yaml").is_file():  # resuming: the run's own data unless named
        cfg.data.source = read_config(Path(out) / "config.yaml").data.source
    if steps is not None:
        cfg.train.steps = steps
    cfg.validate()
    res = train(
        cfg, out, resume=resume, overwrite=overwrite, stop_after=stop_after, init=init, quiet=quiet, protect=[recipe]
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return res
    vl = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    state = "stopped early (resume with --resume)" if res.stopped_early else "finished"
    if res.ran == 0:
        print(f"{cfg.name}: nothing to train: the run already ended at step {res.step} (its --steps); raise --steps "
              f"to continue it; run folder {res.run_dir}", file=sys.stderr)  # fmt: skip
        return res
    print(
        f"{cfg.name}: {state} at step {res.step}; val loss {vl}; {res.tokens_per_s:,.0f} tokens/s; "
        f"run folder {res.run_dir}",
        file=sys.stderr,
    )
    return res


def threads_for(threads: int | None, run) -> None:
    """--threads, else the run's train.threads, else auto (the cores idle now)."""
    from ..runtime import set_cpu_threads

    if next(run.model.parameters()).device.type == "cpu":
        set_cpu_threads(threads if threads is not None else run.cfg.train.threads, "--threads")


def cmd_eval(
    run: Run,
    data: str,
    split: Literal["val", "all"] = "val",
    max_tokens: int = 1_000_000,
    as_json: Json = False,
    threads: int | None = None,
):
    """Loss, perplexity and bits per byte of a run or checkpoint on a source.

    Args:
        run: run folder or checkpoint folder
        data: the text to score: stdlib, a file, a folder, a .jsonl, a .parquet or a tokenized dataset
        split: val: the documents the split rule holds out; all: every document
        max_tokens: score at most this many tokens
        as_json: print the result as one JSON object
        threads: torch CPU threads; unset: the run's train.threads, else the cores this process may use
    """
    from ..inference import evaluate_source
    from ..store.run import load_run

    positive(max_tokens=max_tokens, threads=threads)
    loaded = load_run(run)
    threads_for(threads, loaded)
    r = evaluate_source(loaded, data, split=split, max_tokens=max_tokens)
    if as_json:
        print(json.dumps(r))
    else:
        print(
            f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} bits/byte | {r['tokens']:,} tokens"
        )
    return r


def cmd_memory(
    recipe: Recipe,
    devices: int = 1,
    expert_parallel: int = 1,
    zero: Literal[0, 1, 2, 3] = 0,
    dtype: Literal["fp32", "bf16"] = "fp32",
    micro_batch: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    measure: bool = False,
    pipeline: int = 1,
    micro_batches: int | None = None,
    schedule: Schedule = "1f1b",
    virtual_stages: int = 1,
    as_json: Json = False,
):
    """Predict (and optionally measure) memory per device for a model and its dense twin.

    Args:
        recipe: recipe or YAML (presets: mixtral-8x7b, olmoe-1b-7b, llama-7b), or an MoE run folder: its measured
            expert loads give the busiest expert-parallel rank's activations
        devices: devices the model is spread over
        expert_parallel: expert-parallel degree (divides --devices)
        zero: ZeRO stage: what data parallelism shards (1 optimizer state, 2 + gradients, 3 + weights)
        dtype: parameter and activation precision
        micro_batch: sequences per micro-batch
        seq_len: tokens per sequence; unset: the recipe's data.seq_len
        activation_checkpointing: recompute activations in the backward pass
        measure: also run real steps here and measure (a run: its weights on its own text, every rank; with
            --pipeline: each pipeline rank's bytes and its measured bubble, in P real processes)
        pipeline: pipeline ranks: also the bytes per rank (its stages' weights, gradients, optimizer state and the
            activations of the micro-batches in flight at its peak) and the schedule's bubble
        micro_batches: micro-batches per step in the pipeline; unset: the recipe's train.grad_accum (at least P)
        schedule: pipeline schedule (the stages are cut at the recipe's parallel.pipeline_split, or evenly)
        virtual_stages: stages per rank (interleaved_1f1b, looped_bfs, interleaved_zb)
        as_json: print the plans as JSON
    """
    from ..analysis.memory.plan import format_plans
    from ..analysis.memory.report import memory_report
    from ..analysis.memory.setup import MemorySetup, PipelineShape
    from ..run_config import load_config
    from ..store.run import read_run_config

    positive(devices=devices, expert_parallel=expert_parallel, micro_batch=micro_batch, seq_len=seq_len,
             pipeline=pipeline, virtual_stages=virtual_stages, micro_batches=micro_batches)  # fmt: skip
    require(devices % expert_parallel == 0, "--expert-parallel", f"a divisor of --devices {devices}", expert_parallel)
    require(pipeline > 1 or virtual_stages == 1, "--virtual-stages", "1 without --pipeline", virtual_stages)
    run = Path(recipe) if Path(recipe).is_dir() else None
    cfg = read_run_config(run)[1] if run is not None else load_config(recipe)
    seq_len = seq_len or cfg.data.seq_len
    setup = MemorySetup(
        micro_batch=micro_batch, seq_len=seq_len, devices=devices, expert_parallel=expert_parallel, zero=zero,
        dtype=dtype, activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    shape = None
    if pipeline > 1:
        points = cfg.parallel.pipeline_split
        shape = PipelineShape(
            pipeline=pipeline, micro_batches=micro_batches or max(cfg.train.grad_accum, pipeline),
            micro_batch=micro_batch, seq_len=seq_len, schedule=schedule, virtual=virtual_stages,
            points=tuple(points) if points is not None else None,
        )  # fmt: skip
    report = memory_report(cfg, setup, run=run, measure=measure, pipeline=shape)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        print(setup.describe(cfg.name))
        print(format_plans(report.plans, report.measured))
        _print_extra(cfg, report.extra)
    return report.plans, report.measured


def _print_extra(cfg, extra: dict) -> None:
    """What `moelab memory` adds for a quantized checkpoint, a run's measured loads and a pipeline."""
    if "pipeline" in extra:
        from ..analysis.memory.pipeline_plan import format_stages

        pp = extra["pipeline"]
        print(
            f"pipeline: {pp['pipeline']} ranks, {pp['schedule']}, {pp['micro_batches']} micro-batches "
            f"(fp32, {cfg.optim.name})"
        )
        print(format_stages(pp["ranks"], pp["bubble"], pp.get("measured")))
        if pp["schedule"] == "interleaved_zb":
            print(
                "interleaved_zb: the activations are a lower bound - the deferred weight gradients keep theirs "
                "(and the graph) until they run; --measure shows how much more"
            )
    q = extra.get("quantized_weight_bytes")
    if q is not None:
        print(
            f"weights as quantized ({cfg.quant.what} at {cfg.quant.bits} bits, groups of {cfg.quant.group_size}): "
            f"{q['total'] / 2**20:,.2f} MiB resident ({q['quantized'] / 2**20:,.2f} MiB of them "
            "packed codes, scales and zero points)"
        )
    if "skewed_activations" in extra:
        print(extra["skewed_activations"]["text"])


def cmd_profile(
    src: Annotated[str, Positional, arg(metavar="RECIPE_OR_RUN")],
    overrides: Overrides = (),
    data: str | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    out: str | None = None,
    overwrite: bool = False,
    as_json: Json = False,
):
    """Where a training step's time goes, phase by phase, forward and backward; for an MoE next to its dense twin and
    to itself with balanced routing.

    Args:
        src: recipe or YAML (a fresh model), or a run folder or checkpoint (its trained weights and router)
        overrides: dotted config overrides of a recipe, e.g. train.batch_size=8
        data: training text; unset: the recipe's or the run's
        steps: steps timed per variant and round, and profiled per variant
        warmup: untimed steps first
        rounds: clock-timed rounds, variants in turn; the median round counts
        out: folder for profile.json and the Chrome traces (trace.json: the model itself); unset: print only
        overwrite: replace an existing --out
        as_json: print profile.json's content instead of the tables
    """
    from ..analysis.profile.report import format_tables, run_profile

    positive(steps=steps, rounds=rounds)
    require(warmup >= 0, "--warmup", "0 or a positive number of steps", warmup)
    res = run_profile(
        src, data=data, steps=steps, warmup=warmup, rounds=rounds, out=Path(out) if out else None,
        overwrite=overwrite, overrides=list(overrides),
    )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for all
        return res
    if as_json:
        print(json.dumps(res))
        return res
    print(format_tables(res))
    for key in ("overhead", "imbalance"):
        if key in res:
            print(res[key]["text"])
    if out:
        print(f"profile: {Path(out) / 'profile.json'}; trace (Perfetto, TensorBoard): {Path(out) / 'trace.json'}")
    return res


def cmd_experts(
    runs: Annotated[tuple[str, ...], Positional, arg(metavar="RUN")],
    data: str,
    out: str | None = None,
    tokens: int = 50_000,
    split: Literal["val", "all"] = "val",
    since: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
):
    """What each expert takes (share, characteristic tokens, token classes, domains), router confidence, co-activation
    and routing stability over training; with two runs (BASE TUNED), how the fine-tune moved the routing.

    Args:
        runs: a run folder or checkpoint; or two, BASE then TUNED, of the same architecture
        data: text to route, comma-separated sources, one domain each (a .jsonl's `domain` field also names one)
        out: report folder (report.html, experts.json, PNGs); unset: RUN-experts beside the (last) run folder
        tokens: route at most this many tokens of each domain
        split: val: the documents the split rule holds out; all: every document
        since: compare routing with the run's checkpoint at this step; unset: its earliest kept
        overwrite: replace an existing --out
        threads: torch CPU threads; unset: the run's train.threads, else the cores this process may use
    """
    from ..analysis.experts.report import run_experts
    from ..runtime import set_cpu_threads

    require(len(runs) in (1, 2), "RUN", "one run, or two (BASE TUNED)", list(runs))
    positive(tokens=tokens, threads=threads)
    require(since is None or since >= 0, "--since", "a step number", since)
    sources = [s.strip() for s in data.split(",") if s.strip()]
    require(bool(sources), "--data", "one or more comma-separated sources", data)
    target = Path(out) if out else default_experts_out(runs[-1])
    set_cpu_threads(threads, "--threads")
    res = run_experts(
        list(runs), sources, target, max_tokens=tokens, split=split, since=since, overwrite=overwrite
    )  # fmt: skip
    print(f"report: {target / 'report.html'}\nexperts: {target / 'experts.json'}")
    for line in [*res["summary"], *res.get("alarms", []), *([res["advice"]] if "advice" in res else [])]:
        print("- " + line)
    return res


def default_experts_out(run: str) -> Path:
    """RUN-experts beside a run folder; for a checkpoint RUN/checkpoints/step-N, RUN-experts-step-N (never inside
    the run)."""
    p = Path(run.rstrip("/"))
    if p.parent.name == "checkpoints":
        return p.parent.parent.with_name(f"{p.parent.parent.name}-experts-{p.name}")
    return p.with_name(p.name + "-experts")


def cmd_demo(out: str = "runs/demo", steps: int | None = None):
    """Train tiny-dense and tiny-moe on stdlib and compare them.

    Args:
        out: report folder
        steps: steps per model; unset: the recipes'
    """
    from ..demo import run_demo

    positive(steps=steps)
    return run_demo(Path(out), steps)
