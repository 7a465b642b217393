"""Commands that serve a trained model: generate (text, with a KV cache) and bench-infer (decode speed and
memory of an MoE beside its dense twins). torch is imported inside each, as in cli.run."""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated

from tyro.conf import Positional, UseAppendAction, arg

from .args import Json, Overrides, Run, number_list, positive, require
from .run import threads_for


def cmd_generate(
    run: Run,
    prompt: str | None = None,
    prompts: str | None = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop: Annotated[tuple[str, ...], UseAppendAction] = (),
    ignore_eos: bool = False,
    no_cache: bool = False,
    as_json: Json = False,
    threads: int | None = None,
):
    """Continue prompts with a trained model (a KV cache; several prompts decode as one batch).

    Args:
        run: run folder or checkpoint folder
        prompt: the text to continue
        prompts: a file of prompts, one per line ("\\n" for a newline), or a .jsonl with a "prompt" field
        max_new_tokens: at most this many tokens per prompt
        temperature: sampling temperature; 0 = greedy
        top_k: sample among the k likeliest tokens; 0 = no limit
        seed: sampling seed
        stop: end a continuation at this text (not printed; "\\n" for a newline)
        ignore_eos: go on past the end-of-text token
        no_cache: no KV cache: one prompt at a time, the whole context again for each token (the reference)
        as_json: one JSON object per prompt (prompt, completion, tokens, finish)
        threads: torch CPU threads; unset: the run's train.threads, else the cores this process may use
    """
    from ..serve.generate import generate, read_prompts
    from ..store.run import load_run

    positive(max_new_tokens=max_new_tokens, threads=threads)
    require(top_k >= 0, "--top-k", "0 (no limit) or a positive number", top_k)
    require(
        math.isfinite(temperature) and temperature >= 0, "--temperature", "0 (greedy) or a positive number", temperature
    )
    require((prompt is None) != (prompts is None), "--prompt/--prompts", "exactly one of them", "both or neither")
    texts = [prompt] if prompt is not None else read_prompts(str(prompts))
    stop = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in stop)
    loaded = load_run(run)
    threads_for(threads, loaded)
    done = generate(
        loaded, texts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
        stop=stop, ignore_eos=ignore_eos, use_cache=not no_cache,
    )  # fmt: skip
    for i, c in enumerate(done):
        if as_json:
            print(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens, "finish": c.finish}))
            continue
        if len(done) > 1:
            print(f"--- prompt {i + 1} ({c.tokens} tokens, {c.finish})")
        print(c.prompt + c.text)
        if c.finish == "context":
            print(f"moelab generate: prompt {i + 1} stopped at the model's context of "
                  f"{loaded.cfg.model.max_seq_len} tokens (model.max_seq_len)", file=sys.stderr)  # fmt: skip
    return done[0].prompt + done[0].text if len(done) == 1 else done


def cmd_bench_infer(
    src: Annotated[str, Positional, arg(metavar="RUN_OR_RECIPE")],
    overrides: Overrides = (),
    batch: str = "1,8",
    rounds: int = 3,
    reference: bool = False,
    threads: int | None = None,
    as_json: Json = False,
):
    """Decode and prefill speed and resident memory of a model, its dense twin (equal active parameters) and its dense
    total twin (equal total parameters), generating the model's whole context with the KV cache.

    Args:
        src: a run folder or checkpoint (trained routing), or a recipe or YAML (random weights)
        overrides: dotted config overrides of a recipe, e.g. model.moe.n_experts=16
        batch: batch sizes to decode at, comma-separated
        rounds: rounds, models in turn within each; the median counts
        reference: also time the model without the cache at batch 1 (slow: the whole prefix again per token)
        threads: torch CPU threads; unset: the cores this process may use
        as_json: print the figures as one JSON object
    """
    from ..runtime import set_cpu_threads
    from ..serve.bench import bench_source, format_report

    positive(rounds=rounds, threads=threads)
    batches = [int(b) for b in number_list(batch, float, "--batch")]
    require(all(b == int(b) for b in number_list(batch, float, "--batch")), "--batch", "whole numbers", batch)
    set_cpu_threads(threads, "--threads")
    rep = bench_source(src, list(overrides), batches, rounds, reference)
    print(json.dumps(rep.to_json()) if as_json else format_report(rep))
    return rep
