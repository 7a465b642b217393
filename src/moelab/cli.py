"""`moelab` command line. Each subcommand is a plain typed function; argparse only maps
arguments onto it, and expected failures print one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

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
    res = train(cfg, out, resume=resume, overwrite=overwrite, stop_after=stop_after, init=init, quiet=quiet)
    vl = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    state = "stopped early (resume with --resume)" if res.stopped_early else "finished"
    print(
        f"{cfg.name}: {state} at step {res.step}; val loss {vl}; {res.tokens_per_s:,.0f} tokens/s; "
        f"run folder {res.run_dir}",
        file=sys.stderr,
    )
    return res


def cmd_eval(run: str, data: str, as_json: bool = False, split: str = "val", max_tokens: int = 1_000_000):
    """Loss, perplexity and bits per byte of a run or checkpoint on a source."""
    from .inference import evaluate_source, load_run

    _require(split in ("val", "all"), "--split", "val or all", split)
    _require(max_tokens > 0, "--max-tokens", "a positive number", max_tokens)
    r = evaluate_source(load_run(run), data, split=split, max_tokens=max_tokens)
    if as_json:
        print(json.dumps(r))
    else:
        print(
            f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
            f"{r['bits_per_byte']:.4f} bits/byte | {r['tokens']:,} tokens"
        )
    return r


def cmd_generate(
    run: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 50, seed: int = 0
):
    """Continue a prompt with a trained model."""
    from .inference import generate, load_run

    _require(max_new_tokens > 0, "--max-new-tokens", "a positive number", max_new_tokens)
    _require(top_k >= 0, "--top-k", "0 (no limit) or a positive number", top_k)
    _require(temperature >= 0, "--temperature", "0 (greedy) or a positive number", temperature)
    text = generate(load_run(run), prompt, max_new_tokens, temperature, top_k, seed)
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
    if as_json:
        out = [dict(p.to_json(), **({"measured": measured[p.name]} if p.name in measured else {})) for p in plans]
        print(json.dumps(out))
    else:
        print(
            f"{cfg.name}: micro-batch {micro_batch} x {seq_len} tokens, {devices} device(s), expert-parallel "
            f"{expert_parallel}, ZeRO {zero}, {dtype}{', activation checkpointing' if activation_checkpointing else ''}"
        )
        print(format_plans(plans, measured))
    return plans, measured


def cmd_compare(
    items: list[str],
    data: str | None,
    out: str,
    steps: int | None = None,
    tokens: int | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
):
    """Train recipes (or read finished runs) on the same data and budget; write report.html and summary.json."""
    from .analysis.compare import compare

    summary = compare(items, data, Path(out), steps=steps, tokens=tokens, overrides=overrides, quiet=quiet)
    print(f"report: {Path(out) / 'report.html'}\nsummary: {Path(out) / 'summary.json'}")
    for line in summary["summary"]:
        print("- " + line)
    return summary


def _list(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma-separated list of numbers, got {text!r}") from None


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


def cmd_lr_fit(sweep_dir: str, target_params: float | None = None, count: str = "non_embedding"):
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
    from .data.tokenizer import load_tokenizer, train_tokenizer

    _require(0 < val_fraction < 1, "--val-fraction", "a number in (0, 1)", val_fraction)
    _require(vocab_size >= 260, "--vocab-size", "at least 260 (256 bytes and the special tokens)", vocab_size)
    _require(tokenizer_train_bytes > 0, "--tokenizer-train-bytes", "a positive number", tokenizer_train_bytes)
    _require(chunk_bytes > 0, "--chunk-bytes", "a positive number", chunk_bytes)
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
    from .inference import load_run
    from .outputs import check_output, staged_output

    check_output(out, overwrite=overwrite, protect=[run])
    r = load_run(run, device="cpu")
    run_dir = r.checkpoint.parent.parent
    if peft:
        if r.cfg.finetune.recipe != "lora":
            raise ConfigError("--peft: this run was not fine-tuned with --recipe lora")
        from .finetune.peft_export import export_peft
        from .train.checkpoint import load_tensors

        with staged_output(out, overwrite=overwrite, protect=[run_dir]) as tmp:
            export_peft(r.cfg, load_tensors(r.checkpoint, "model.safetensors"), run_dir / "tokenizer.json", tmp)
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
    command: str = "",
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
        command,
        quiet,
    )
    print(markdown(res, f"{out}/heldout_loss.png"))
    return res


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every `moelab` subcommand."""
    ap = argparse.ArgumentParser(prog="moelab", description="Train, measure and convert MoE language models.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("recipe", help="named recipe (tiny-dense, tiny-moe, small-dense, small-moe) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--data", help="stdlib, a text file, a folder, a .jsonl or a .parquet")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--steps", type=int, help="total run length (the LR schedule's horizon)")
    p.add_argument("--stop-after", type=int, help="end this invocation after K steps, with a checkpoint")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete --out and start over")
    p.add_argument("--init", help="initialise weights from a run or checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="val: the documents the split rule holds out (default); all: every document",
    )
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--json", action="store_true", dest="as_json")

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_RUN")
    p.add_argument("--data", help="training data for recipes (default: the recipe's, stdlib)")
    p.add_argument("--out", required=True)
    b = p.add_mutually_exclusive_group()
    b.add_argument("--steps", type=int)
    b.add_argument("--tokens", type=int, help="token budget per run (steps derived per recipe)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="key=value",
        dest="overrides",
        help="override applied to every recipe (repeatable)",
    )
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("lr-sweep", help=cmd_lr_sweep.__doc__)
    p.add_argument("--recipe", required=True)
    p.add_argument("--sizes", required=True, help="comma-separated d_model values, e.g. 64,128,256")
    p.add_argument("--lrs", required=True, help="comma-separated peak LRs, e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--data")
    p.add_argument("--out", required=True)
    b = p.add_mutually_exclusive_group()
    b.add_argument("--steps", type=int)
    b.add_argument("--tokens-per-param", type=float, help="steps = T * non-embedding params / tokens per step")
    p.add_argument("--set", action="append", default=[], metavar="key=value", dest="overrides")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("lr-fit", help=cmd_lr_fit.__doc__)
    p.add_argument("sweep_dir")
    p.add_argument("--target-params", type=float)
    p.add_argument("--count", choices=["non-embedding", "active", "total"], default="non-embedding")

    p = sub.add_parser("finetune", help=cmd_finetune.__doc__)
    p.add_argument("run", help="run folder or checkpoint to start from")
    p.add_argument("--data", required=True, help="stdlib-docstrings, or a .jsonl with messages or prompt/completion")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--recipe", required=True, choices=["full", "freeze-experts", "freeze-router", "experts-only", "lora"]
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("finetune-report", help=cmd_finetune_report.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--bases", default="small-dense,small-moe", help="comma-separated recipes to pretrain")
    p.add_argument("--data", default="stdlib-docstrings", help="fine-tuning data")
    p.add_argument("--pretrain-data", default="stdlib")
    p.add_argument("--pretrain-steps", type=int, help="default: each recipe's train.steps")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per variant")
    p.add_argument("--train-examples", type=int, default=400, help="seeded sample of training examples")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="key=value",
        dest="overrides",
        help="override for pretraining (repeatable)",
    )
    p.add_argument(
        "--ft-set",
        action="append",
        default=[],
        metavar="key=value",
        dest="ft_overrides",
        help="override for every fine-tune (repeatable)",
    )
    p.add_argument("--doc", help="markdown file whose report section is replaced (e.g. docs/finetuning.md)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("tokenize", help=cmd_tokenize.__doc__)
    p.add_argument(
        "src",
        help="stdlib, a text file, a folder, a .jsonl, a .parquet, a .gz/.zst of those, or a "
        "datasets folder (save_to_disk)",
    )
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--tokenizer", help="a run folder or a tokenizer.json (default: train one on the training split)")
    p.add_argument("--vocab-size", type=int, default=4096, help="when training a tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (by name hash)")
    p.add_argument("--text-field", default="text", help=".jsonl field / .parquet or datasets column")
    p.add_argument("--tokenizer-train-bytes", type=int, default=10_000_000)
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=64 << 20,
        help="source text per shard pair: the unit a killed run resumes from",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a folder holding another dataset")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("quantize", help=cmd_quantize.__doc__)
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--bits", type=int, required=True, help="8, 4, 3 or 2")
    p.add_argument("--group-size", type=int, default=64, help="inputs sharing one scale and zero point")
    p.add_argument("--what", choices=["experts", "all"], default="experts")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prune-experts", help="keep the E2 experts per MoE layer that add most (REAP score)")
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--keep", type=int, required=True, help="experts to keep per MoE layer")
    p.add_argument("--calib", required=True, help="calibration text source")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("merge-experts", help="merge each MoE layer's experts into E2 (usage-weighted averages)")
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer after merging")
    p.add_argument("--calib", required=True, help="calibration text source")
    p.add_argument("--method", choices=["frequency", "output-cluster"], default="frequency")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("distill", help=cmd_distill.__doc__)
    p.add_argument("teacher", help="teacher run or checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the student's config")
    p.add_argument("--student", required=True, help="student recipe/YAML, or a run/checkpoint to start from")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the LM loss (1 - alpha: the KL)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true")
    g.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("import", help=cmd_import.__doc__)
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", help="force a target (llama, mistral, qwen2, mixtral, qwen2_moe, qwen3_moe, olmoe)")
    p.add_argument("--peft", action="store_true", help="LoRA runs: write OUT/base and a peft adapter in OUT/adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    p = sub.add_parser("upcycle", help=cmd_upcycle.__doc__)
    p.add_argument("src", help="HF folder or moelab run/checkpoint of a dense model")
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--router-init", choices=["zeros", "normal", "hidden"], default="zeros")
    p.add_argument("--noise", type=float, default=0.0, help="multiplicative noise std on expert copies")
    p.add_argument("--granularity", type=int, default=1, help="split each FFN into G fine-grained experts")
    p.add_argument("--pattern", choices=["all", "alternate"], default="all")
    p.add_argument("--first-dense", type=int, default=0)
    p.add_argument("--prompts", help="text file, one prompt per expert (for --router-init hidden)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    p = sub.add_parser("memory", help=cmd_memory.__doc__)
    p.add_argument("recipe", help="recipe or YAML (presets: mixtral-8x7b, olmoe-1b-7b, llama-7b)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--expert-parallel", type=int, default=1)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--measure", action="store_true", help="also run real steps here and measure")
    p.add_argument("--json", action="store_true", dest="as_json")

    p = sub.add_parser("demo", help="train tiny-dense and tiny-moe on stdlib and compare them")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run `moelab` with `argv` (default: sys.argv). Returns the exit code: 0, or 2 after printing a MoelabError as one
    line."""
    parser = build_parser()
    # key=value overrides may come after options too; argparse alone would reject them.
    args, extra = parser.parse_known_args(argv)
    bad = [
        a for a in extra if a.startswith("-") or "=" not in a or args.command not in ("train", "finetune", "distill")
    ]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command in ("train", "finetune", "distill"):
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    try:
        if args.command == "train":
            cmd_train(
                args.recipe,
                args.data,
                args.out,
                args.steps,
                args.stop_after,
                args.resume,
                args.overwrite,
                args.init,
                args.overrides,
                args.quiet,
            )
        elif args.command == "eval":
            cmd_eval(args.run, args.data, args.as_json, args.split, args.max_tokens)
        elif args.command == "generate":
            cmd_generate(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
        elif args.command == "compare":
            cmd_compare(args.items, args.data, args.out, args.steps, args.tokens, args.overrides, args.quiet)
        elif args.command == "lr-sweep":
            cmd_lr_sweep(
                args.recipe,
                args.sizes,
                args.lrs,
                args.data,
                args.out,
                args.steps,
                args.tokens_per_param,
                args.overrides,
                args.quiet,
            )
        elif args.command == "lr-fit":
            cmd_lr_fit(args.sweep_dir, args.target_params, args.count)
        elif args.command == "finetune":
            cmd_finetune(
                args.run, args.data, args.out, args.recipe, args.steps, args.overrides, args.overwrite, args.quiet
            )
        elif args.command == "finetune-report":
            cmd_finetune_report(
                args.out,
                args.bases,
                args.data,
                args.pretrain_data,
                args.pretrain_steps,
                args.steps,
                args.train_examples,
                args.lr,
                args.lora_lr,
                args.batch_size,
                args.overrides,
                args.ft_overrides,
                args.doc,
                shlex.join(["moelab", *(sys.argv[1:] if argv is None else argv)]),
                args.quiet,
            )
        elif args.command == "tokenize":
            cmd_tokenize(
                args.src,
                args.out,
                args.tokenizer,
                args.vocab_size,
                args.val_fraction,
                args.text_field,
                args.tokenizer_train_bytes,
                args.overwrite,
                args.quiet,
                args.chunk_bytes,
            )
        elif args.command == "quantize":
            cmd_quantize(args.ckpt, args.out, args.bits, args.group_size, args.what, args.overwrite)
        elif args.command == "prune-experts":
            cmd_reduce_experts(args.ckpt, args.out, args.keep, args.calib, "prune", args.max_tokens, args.overwrite)
        elif args.command == "merge-experts":
            cmd_reduce_experts(
                args.ckpt, args.out, args.experts, args.calib, args.method, args.max_tokens, args.overwrite
            )
        elif args.command == "distill":
            cmd_distill(
                args.teacher,
                args.student,
                args.data,
                args.out,
                args.steps,
                args.temperature,
                args.alpha,
                args.overrides,
                args.resume,
                args.overwrite,
                args.quiet,
            )
        elif args.command == "import":
            cmd_import(args.hf_dir, args.out, args.overwrite)
        elif args.command == "export":
            cmd_export(args.run, args.out, args.arch, args.peft, args.overwrite)
        elif args.command == "upcycle":
            cmd_upcycle(
                args.src,
                args.experts,
                args.top_k,
                args.out,
                args.router_init,
                args.noise,
                args.granularity,
                args.pattern,
                args.first_dense,
                args.prompts,
                args.overwrite,
            )
        elif args.command == "memory":
            cmd_memory(
                args.recipe,
                args.devices,
                args.expert_parallel,
                args.zero,
                args.dtype,
                args.micro_batch,
                args.seq_len,
                args.activation_checkpointing,
                args.measure,
                args.as_json,
            )
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(Path(args.out), args.steps)
    except MoelabError as e:
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
