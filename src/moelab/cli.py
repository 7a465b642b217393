"""`moelab` command line. Each subcommand is a plain typed function; argparse only maps
arguments onto it, and expected failures print one clear line instead of a traceback.

Each command imports what it needs inside its function, on purpose: `moelab --help`, a
bad flag or a refused output answer without importing torch (seconds on a small machine)."""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, MoelabError


def _require(ok: bool, flag: str, expected: str, got) -> None:
    """Arguments are checked where they enter: a bad one names its flag."""
    if not ok:
        raise ConfigError(f"{flag}: expected {expected}, got {got!r}")


def cmd_train(
    recipe: str,
    data: str | None,
    out: str,
    steps: int | None = None,
    stop_after: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init: str | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
):
    """Train a model from a named recipe or a YAML file."""
    from .run_config import load_config, read_config
    from .train import train

    _require(steps is None or steps > 0, "--steps", "a positive number of steps", steps)
    _require(stop_after is None or stop_after > 0, "--stop-after", "a positive number of steps", stop_after)
    cfg = load_config(recipe, overrides)
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
    print(
        f"{cfg.name}: {state} at step {res.step}; val loss {vl}; {res.tokens_per_s:,.0f} tokens/s; "
        f"run folder {res.run_dir}",
        file=sys.stderr,
    )
    return res


def _threads(threads: int | None, run) -> None:
    """--threads, else the run's train.threads, else auto (the cores idle now)."""
    from .runtime import set_cpu_threads

    if next(run.model.parameters()).device.type == "cpu":
        set_cpu_threads(threads if threads is not None else run.cfg.train.threads, "--threads")


def cmd_eval(
    run: str,
    data: str,
    as_json: bool = False,
    split: str = "val",
    max_tokens: int = 1_000_000,
    threads: int | None = None,
):
    """Loss, perplexity and bits per byte of a run or checkpoint on a source."""
    from .inference import evaluate_source
    from .store.run import load_run

    _require(split in ("val", "all"), "--split", "val or all", split)
    _require(max_tokens > 0, "--max-tokens", "a positive number", max_tokens)
    _require(threads is None or threads > 0, "--threads", "a positive number", threads)
    loaded = load_run(run)
    _threads(threads, loaded)
    r = evaluate_source(loaded, data, split=split, max_tokens=max_tokens)
    if as_json:
        print(json.dumps(r))
    else:
        print(
            f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} bits/byte | {r['tokens']:,} tokens"
        )
    return r


def cmd_generate(
    run: str,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    threads: int | None = None,
):
    """Continue a prompt with a trained model."""
    from .inference import generate
    from .store.run import load_run

    _require(max_new_tokens > 0, "--max-new-tokens", "a positive number", max_new_tokens)
    _require(top_k >= 0, "--top-k", "0 (no limit) or a positive number", top_k)
    _require(
        math.isfinite(temperature) and temperature >= 0, "--temperature", "0 (greedy) or a positive number", temperature
    )
    _require(threads is None or threads > 0, "--threads", "a positive number", threads)
    loaded = load_run(run)
    _threads(threads, loaded)
    text = generate(loaded, prompt, max_new_tokens, temperature, top_k, seed)
    print(text)
    return text


def cmd_memory(
    recipe: str,
    devices: int = 1,
    expert_parallel: int = 1,
    zero: int = 0,
    dtype: str = "fp32",
    micro_batch: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    measure: bool = False,
    as_json: bool = False,
):
    """Predict (and optionally measure) memory per device for a model and its dense twin."""
    from .analysis.memory import format_plans, plan_and_measure
    from .run_config import load_config

    _require(devices > 0, "--devices", "a positive number of devices", devices)
    _require(expert_parallel > 0, "--expert-parallel", "a positive degree", expert_parallel)
    _require(devices % expert_parallel == 0, "--expert-parallel", f"a divisor of --devices {devices}", expert_parallel)
    _require(micro_batch > 0, "--micro-batch", "a positive number of sequences", micro_batch)
    _require(seq_len is None or seq_len > 0, "--seq-len", "a positive number of tokens", seq_len)
    _require(zero in (0, 1, 2, 3), "--zero", "0, 1, 2 or 3", zero)
    cfg = load_config(recipe)
    seq_len = seq_len or cfg.data.seq_len
    _require(
        seq_len <= cfg.model.max_seq_len, "--seq-len", f"at most model.max_seq_len={cfg.model.max_seq_len}", seq_len
    )
    plans, measured = plan_and_measure(
        cfg,
        micro_batch=micro_batch,
        seq_len=seq_len,
        devices=devices,
        expert_parallel=expert_parallel,
        zero=zero,
        dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        measure=measure,
    )
    quantized = None
    if cfg.quant.bits:  # a checkpoint written by `moelab quantize`: what its weights take resident
        from .model.quant import planned_bytes

        quantized = planned_bytes(cfg.model, cfg.quant.bits, cfg.quant.group_size, cfg.quant.what)
    if as_json:
        out = [dict(p.to_json(), **({"measured": measured[p.name]} if p.name in measured else {})) for p in plans]
        if quantized is not None:
            out[0]["quantized_weight_bytes"] = quantized
        print(json.dumps(out))
    else:
        print(
            f"{cfg.name}: micro-batch {micro_batch} x {seq_len} tokens, {devices} device(s), expert-parallel "
            f"{expert_parallel}, ZeRO {zero}, {dtype}{', activation checkpointing' if activation_checkpointing else ''}"
        )
        print(format_plans(plans, measured))
        if quantized is not None:
            print(
                f"weights as quantized ({cfg.quant.what} at {cfg.quant.bits} bits, groups of {cfg.quant.group_size}): "
                f"{quantized['total'] / 2**20:,.2f} MiB resident ({quantized['quantized'] / 2**20:,.2f} MiB of them "
                "packed codes, scales and zero points)"
            )
    return plans, measured


def cmd_compare(
    items: list[str],
    data: str | None,
    out: str,
    steps: int | None = None,
    tokens: int | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
):
    """Train recipes (or read finished runs) on the same data and budget; write report.html and summary.json."""
    from .analysis.compare import compare

    summary = compare(
        items, data, Path(out), steps=steps, tokens=tokens, overrides=overrides, quiet=quiet, overwrite=overwrite
    )
    print(f"report: {Path(out) / 'report.html'}\nsummary: {Path(out) / 'summary.json'}")
    for line in summary["summary"]:
        print("- " + line)
    return summary


def _list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{flag}: expected a comma-separated list of positive numbers, got {text!r}")
    return values


def cmd_lr_sweep(
    recipe: str,
    sizes: str,
    lrs: str,
    data: str | None,
    out: str,
    steps: int | None = None,
    tokens_per_param: float | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
):
    """Grid-search the peak LR at several model sizes (resumable)."""
    from .analysis.lr_sweep import lr_sweep

    _require(steps is None or steps > 0, "--steps", "a positive number of steps", steps)
    _require(
        tokens_per_param is None or (math.isfinite(tokens_per_param) and tokens_per_param > 0),
        "--tokens-per-param",
        "a positive number",
        tokens_per_param,
    )

    rows = lr_sweep(
        recipe,
        _list(sizes, int, "--sizes"),
        _list(lrs, float, "--lrs"),
        data,
        Path(out),
        steps,
        tokens_per_param,
        overrides,
        quiet,
    )
    print(f"{len(rows)} runs in {Path(out) / 'sweep.jsonl'}; fit them with: moelab lr-fit {out}")
    return rows


def cmd_lr_fit(sweep_dir: str, target_params: float | None = None, count: str = "non-embedding"):
    """Fit log(lr*) = a log(N) + b on a sweep and predict the LR for a target size."""
    from .analysis.lr_scaling import fit_sweep

    res = fit_sweep(Path(sweep_dir), count.replace("-", "_"), target_params)
    f = res["fit"]
    for o in res["optima"]:
        print(
            f"d_model {o['d_model']:>5}: N={o['n_params']:,}  lr*={o['lr']:.4g}  loss {o['loss']:.4f}"
            + ("  (grid edge)" if o["at_edge"] else "")
        )
    print(
        f"fit: log lr* = {f['a']:.4f} log N + {f['b']:.4f}   R^2={f['r2']:.3f}   "
        f"a in [{f['a_interval'][0]:.3f}, {f['a_interval'][1]:.3f}], b in [{f['b_interval'][0]:.3f}, "
        f"{f['b_interval'][1]:.3f}] (bootstrap 90%)"
    )
    print("MM1: log lr* = -0.4214 log N - 0.5535")
    if "target" in res:
        t = res["target"]
        print(
            f"target N={t['params']:,.0f}: lr*={t['lr']:.4g}, weight decay 0.1*lr*={t['weight_decay']:.3g} "
            f"(MM1 rule: {t['mm1_lr']:.4g})"
        )
    print(
        f"plot: {Path(sweep_dir) / 'lr_fit.png'}; fit: {Path(sweep_dir) / 'fit.json'} "
        f"(train with optim.lr=auto optim.lr_fit={Path(sweep_dir) / 'fit.json'})"
    )
    return res


def cmd_tokenize(
    src: str,
    out: str,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    tokenizer_train_bytes: int = 10_000_000,
    overwrite: bool = False,
    quiet: bool = False,
    chunk_bytes: int = 64 << 20,
):
    """Tokenize a source once into memory-mapped token shards (train with --data DATASET)."""
    from .data import tokenize_source, training_texts
    from .data.dataset import resumable_tokenizer
    from .data.tokenizer import train_tokenizer
    from .store.outputs import guard_output
    from .store.run import load_tokenizer

    _require(0 < val_fraction < 1, "--val-fraction", "a number in (0, 1)", val_fraction)
    _require(vocab_size >= 260, "--vocab-size", "at least 260 (256 bytes and the special tokens)", vocab_size)
    _require(tokenizer_train_bytes > 0, "--tokenizer-train-bytes", "a positive number", tokenizer_train_bytes)
    _require(chunk_bytes > 0, "--chunk-bytes", "a positive number", chunk_bytes)
    guard_output(out, protect=[src, tokenizer])  # before a tokenizer is trained: fail in seconds
    if tokenizer is not None:
        path = Path(tokenizer)
        tok = load_tokenizer(path / "tokenizer.json" if path.is_dir() else path)
    else:
        tok = resumable_tokenizer(src, Path(out), text_field, val_fraction) or train_tokenizer(
            training_texts(src, text_field, val_fraction), vocab_size, tokenizer_train_bytes
        )
    path = tokenize_source(
        src,
        out,
        tok,
        text_field=text_field,
        val_fraction=val_fraction,
        overwrite=overwrite,
        quiet=quiet,
        chunk_bytes=chunk_bytes,
    )
    m = json.loads((path / "manifest.json").read_text())
    print(
        f"{path}: train {m['splits']['train']['tokens']:,} tokens in {m['splits']['train']['docs']:,} documents, "
        f"validation {m['splits']['val']['tokens']:,} in {m['splits']['val']['docs']:,} ({m['dtype']}); "
        f"train with --data {path}"
    )
    return path


def cmd_consolidate(run: str, out: str, overwrite: bool = False):
    """Write a multi-process run's checkpoint as a single-process run folder (safetensors files)."""
    from .convert.consolidate import consolidate

    path = consolidate(run, out, overwrite)
    print(f"consolidated {run} -> {path} (resume with: moelab train ... --out {out} --resume)")
    return path


def cmd_quantize(ckpt: str, out: str, bits: int, group_size: int = 64, what: str = "experts", overwrite: bool = False):
    """Weight-only group-wise quantization of expert (or all) weights to 8/4/3/2 bits."""
    from .compress.quantize import quantize_checkpoint

    path, before, after = quantize_checkpoint(ckpt, out, bits, group_size, what, overwrite)
    print(
        f"quantized {ckpt} -> {path}: {'expert' if what == 'experts' else 'all matmul'} weights to {bits} bits "
        f"(groups of {group_size}); resident weights "
        f"{before / 2**20:,.2f} MiB -> {after / 2**20:,.2f} MiB ({after / before:.2f}x)"
    )
    return path


def cmd_reduce_experts(
    ckpt: str, out: str, n_experts: int, calib: str, method: str, max_tokens: int = 32768, overwrite: bool = False
):
    """Prune (method 'prune') or merge ('frequency', 'output-cluster') each MoE layer's experts."""
    from .compress.experts import reduce_checkpoint

    _require(max_tokens > 0, "--max-tokens", "a positive number", max_tokens)
    path, model = reduce_checkpoint(ckpt, out, n_experts, calib, method, max_tokens, overwrite)
    assert model.cfg.moe is not None
    pc = model.cfg.param_counts()
    print(
        f"{method} {ckpt} -> {path}: {model.cfg.moe.n_experts} experts per MoE layer, top-{model.cfg.moe.top_k}, "
        f"{pc['total']:,} parameters ({pc['active']:,} active)"
    )
    return path


def cmd_distill(
    teacher: str,
    student: str,
    data: str,
    out: str,
    steps: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Distil a teacher run into a student recipe or checkpoint on its soft targets."""
    from .compress.distill import distill

    _require(steps is None or steps > 0, "--steps", "a positive number of steps", steps)

    res = distill(
        teacher,
        student,
        data,
        out,
        steps=steps,
        temperature=temperature,
        alpha=alpha,
        overrides=overrides,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )
    vl = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    print(f"distilled into {res.run_dir}: step {res.step}, val loss {vl}", file=sys.stderr)
    return res


def cmd_import(hf_dir: str, out: str, overwrite: bool = False):
    """Import a local Hugging Face folder (safetensors) as a moelab checkpoint folder."""
    from .convert.io import import_hf

    path = import_hf(hf_dir, out, overwrite=overwrite)
    print(f"imported {hf_dir} -> {path}")
    return path


def cmd_export(run: str, out: str, arch: str | None = None, peft: bool = False, overwrite: bool = False):
    """Export a run or checkpoint as a Hugging Face folder that transformers loads."""
    from .convert.io import export_hf
    from .store.outputs import check_output, staged_output
    from .store.run import load_run

    check_output(out, overwrite=overwrite, protect=[run])
    r = load_run(run, device="cpu")
    run_dir = r.checkpoint.parent.parent
    if r.cfg.quant.bits:  # (--peft is refused below: a quantized run holds merged weights, no adapters)
        from .model.quant import dequantize_model

        dequantize_model(r.model)
        print(
            f"note: {run} holds {r.cfg.quant.bits}-bit weights ({r.cfg.quant.what}); exporting them dequantized "
            "to fp32 (the values the quantized model computes with)",
            file=sys.stderr,
        )
    if peft:
        if r.cfg.finetune.recipe != "lora":
            raise ConfigError("--peft: this run was not fine-tuned with --recipe lora")
        from .finetune.peft_export import export_peft
        from .store.checkpoint import model_tensors

        with staged_output(out, overwrite=overwrite, protect=[run_dir]) as tmp:
            export_peft(r.cfg, model_tensors(r.checkpoint), run_dir / "tokenizer.json", tmp)
        base, adapter = Path(out) / "base", Path(out) / "adapter"
        print(
            f"exported base model -> {base}\nexported peft adapter -> {adapter}\n"
            f"load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{adapter}')"
        )
        return adapter
    with staged_output(out, overwrite=overwrite, protect=[run_dir]) as tmp:
        export_hf(r.model, tmp, run_dir / "tokenizer.json", arch)
    path = Path(out)
    print(f"exported {r.checkpoint} -> {path} ({json.loads((path / 'config.json').read_text())['model_type']})")
    return path


def cmd_upcycle(
    src: str,
    experts: int,
    top_k: int,
    out: str,
    router_init: str = "zeros",
    noise: float = 0.0,
    granularity: int = 1,
    pattern: str = "all",
    first_dense: int = 0,
    prompts: str | None = None,
    overwrite: bool = False,
):
    """Turn a dense model (HF folder or moelab run) into an MoE whose experts start as copies."""
    from .convert.upcycle import upcycle_to_folder

    _require(experts > 0, "--experts", "a positive number", experts)
    _require(0 < top_k <= experts, "--top-k", f"a number in 1..--experts ({experts})", top_k)
    _require(granularity > 0, "--granularity", "a positive number", granularity)
    _require(noise >= 0, "--noise", "a non-negative standard deviation", noise)
    _require(first_dense >= 0, "--first-dense", "a non-negative number of layers", first_dense)
    path, moe = upcycle_to_folder(
        src,
        Path(out),
        experts,
        top_k,
        router_init=router_init,
        noise=noise,
        granularity=granularity,
        pattern=pattern,
        first_dense=first_dense,
        prompts_file=prompts,
        overwrite=overwrite,
    )
    pc = moe.cfg.param_counts()
    print(
        f"upcycled {src} -> {path}: {moe.cfg.moe.n_experts} experts, top-{moe.cfg.moe.top_k}, "
        f"{pc['total']:,} parameters ({pc['active']:,} active). Continue training with:\n"
        f"  moelab train {path / 'config.yaml'} --init {path} --data SRC --out RUN"
    )
    return path


def cmd_finetune(
    run: str,
    data: str,
    out: str,
    recipe: str,
    steps: int | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Fine-tune a run or checkpoint on chat / prompt-completion data with a recipe."""
    from .finetune.run import finetune

    _require(steps is None or steps > 0, "--steps", "a positive number of steps", steps)

    return finetune(run, data, out, recipe, steps=steps, overrides=overrides or [], overwrite=overwrite, quiet=quiet)


def cmd_finetune_report(
    out: str,
    bases: str,
    data: str,
    pretrain_data: str,
    pretrain_steps: int | None,
    steps: int,
    train_examples: int,
    lr: float,
    lora_lr: float,
    batch_size: int,
    overrides: list[str],
    ft_overrides: list[str],
    doc: str | None,
    command_line: str = "",
    quiet: bool = False,
):
    """Pretrain dense and MoE bases, fine-tune each with every recipe, report train vs held-out loss."""
    from .analysis.finetune_report import markdown, run_report

    res = run_report(
        Path(out),
        [b.strip() for b in bases.split(",") if b.strip()],
        data,
        pretrain_data,
        pretrain_steps,
        overrides,
        steps,
        train_examples,
        lr,
        lora_lr,
        batch_size,
        ft_overrides,
        Path(doc) if doc else None,
        command_line,
        quiet,
    )
    print(markdown(res, f"{out}/heldout_loss.png"))
    return res


def cmd_demo(out: str = "runs/demo", steps: int | None = None):
    """Train tiny-dense and tiny-moe on stdlib and compare them."""
    from .demo import run_demo

    return run_demo(Path(out), steps)


COMMANDS: dict[str, Callable[..., Any]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "compare": cmd_compare,
    "lr-sweep": cmd_lr_sweep,
    "lr-fit": cmd_lr_fit,
    "finetune": cmd_finetune,
    "finetune-report": cmd_finetune_report,
    "tokenize": cmd_tokenize,
    "quantize": cmd_quantize,
    "consolidate": cmd_consolidate,
    "prune-experts": cmd_reduce_experts,
    "merge-experts": cmd_reduce_experts,
    "distill": cmd_distill,
    "import": cmd_import,
    "export": cmd_export,
    "upcycle": cmd_upcycle,
    "memory": cmd_memory,
    "demo": cmd_demo,
}
TAKES_OVERRIDES = ("train", "finetune", "distill")


def main(argv: list[str] | None = None) -> int:
    """Run `moelab` with `argv` (default: sys.argv). Returns the exit code: 0, or 2 after
    printing a MoelabError as one line."""
    from .cli_parser import build_parser

    parser = build_parser()
    # key=value overrides may come after options too; argparse alone would reject them.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or args.command not in TAKES_OVERRIDES]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command in TAKES_OVERRIDES:
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    if args.command == "finetune-report":  # recorded in the report, to rerun it
        args.command_line = shlex.join(["moelab", *(sys.argv[1:] if argv is None else argv)])
    fn = COMMANDS[args.command]
    kwargs = {name: getattr(args, name) for name in inspect.signature(fn).parameters if hasattr(args, name)}
    try:
        fn(**kwargs)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:  # `moelab memory --json | head -c 300`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    except (MoelabError, OSError) as e:
        return _fail(args.command, e, getattr(args, "out", None))
    return 0


def _fail(command: str, e: MoelabError | OSError, out: str | None = None) -> int:
    """An expected failure: one line on stderr, exit code 2. Under torchrun the line also goes
    to the launcher's error file, so its summary names it as the root cause."""
    from .parallel.mesh import record_for_launcher, wait_for_peers_to_fail
    from .store.outputs import describe_os_error

    text = describe_os_error(e, out) if isinstance(e, OSError) else str(e)
    line = f"moelab {command}: error: {text}"
    print(line, file=sys.stderr, flush=True)
    record_for_launcher(line)
    wait_for_peers_to_fail()  # under torchrun: let every rank say it before any is stopped
    return 2


if __name__ == "__main__":
    sys.exit(main())
