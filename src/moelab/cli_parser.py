"""The `moelab` argument parser: one subparser per command, each option's dest named as
the parameter of the `cmd_*` function in `moelab.cli` that it feeds."""

from __future__ import annotations

import argparse

THREADS_HELP = "torch CPU threads (default: the run's train.threads, else the cores this process may use)"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every `moelab` subcommand."""
    ap = argparse.ArgumentParser(prog="moelab", description="Train, measure and convert MoE language models.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a named recipe or a YAML file")
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

    p = sub.add_parser("eval", help="Loss, perplexity and bits per byte of a run or checkpoint on a source.")
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
    p.add_argument("--threads", type=int, help=THREADS_HELP)

    p = sub.add_parser("generate", help="Continue a prompt with a trained model.")
    p.add_argument("run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help=THREADS_HELP)

    p = sub.add_parser(
        "compare",
        help="Train recipes (or read finished runs) on the same data and budget; write report.html and summary.json.",
    )
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new report is done")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("lr-sweep", help="Grid-search the peak LR at several model sizes (resumable).")
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

    p = sub.add_parser("lr-fit", help="Fit log(lr*) = a log(N) + b on a sweep and predict the LR for a target size.")
    p.add_argument("sweep_dir")
    p.add_argument("--target-params", type=float)
    p.add_argument("--count", choices=["non-embedding", "active", "total"], default="non-embedding")

    p = sub.add_parser("finetune", help="Fine-tune a run or checkpoint on chat / prompt-completion data with a recipe.")
    p.add_argument("run", help="run folder or checkpoint to start from")
    p.add_argument("--data", required=True, help="stdlib-docstrings, or a .jsonl with messages or prompt/completion")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--recipe", required=True, choices=["full", "freeze-experts", "freeze-router", "experts-only", "lora"]
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser(
        "finetune-report",
        help="Pretrain dense and MoE bases, fine-tune each with every recipe, report train vs held-out loss.",
    )
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

    p = sub.add_parser(
        "tokenize", help="Tokenize a source once into memory-mapped token shards (train with --data DATASET)."
    )
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

    p = sub.add_parser(
        "consolidate", help="Write a multi-process run's checkpoint as a single-process run folder (safetensors)."
    )
    p.add_argument("run", help="run folder or checkpoint written by torchrun")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "quantize", help="Weight-only group-wise quantization of expert (or all) weights to 8/4/3/2 bits."
    )
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--bits", type=int, required=True, help="8, 4, 3 or 2")
    p.add_argument("--group-size", type=int, default=64, help="inputs sharing one scale and zero point")
    p.add_argument("--what", choices=["experts", "all"], default="experts")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("prune-experts", help="keep the E2 experts per MoE layer that add most (REAP score)")
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--keep", type=int, required=True, dest="n_experts", help="experts to keep per MoE layer")
    p.set_defaults(method="prune")
    p.add_argument("--calib", required=True, help="calibration text source")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("merge-experts", help="merge each MoE layer's experts into E2 (usage-weighted averages)")
    p.add_argument("ckpt", help="run folder or checkpoint")
    p.add_argument("--experts", type=int, required=True, dest="n_experts", help="experts per MoE layer after merging")
    p.add_argument("--calib", required=True, help="calibration text source")
    p.add_argument("--method", choices=["frequency", "output-cluster"], default="frequency")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("distill", help="Distil a teacher run into a student recipe or checkpoint on its soft targets.")
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

    p = sub.add_parser("import", help="Import a local Hugging Face folder (safetensors) as a moelab checkpoint folder.")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    p = sub.add_parser("export", help="Export a run or checkpoint as a Hugging Face folder that transformers loads.")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", help="force a target (llama, mistral, qwen2, mixtral, qwen2_moe, qwen3_moe, olmoe)")
    p.add_argument("--peft", action="store_true", help="LoRA runs: write OUT/base and a peft adapter in OUT/adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    p = sub.add_parser(
        "upcycle", help="Turn a dense model (HF folder or moelab run) into an MoE whose experts start as copies."
    )
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

    p = sub.add_parser(
        "memory", help="Predict (and optionally measure) memory per device for a model and its dense twin."
    )
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
