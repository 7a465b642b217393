"""Commands that turn one stored model into another: consolidate, quantize, prune-experts,
merge-experts, distill, import, export, upcycle (torch imported inside each, as in cli.run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import Positional, arg

from ..errors import ConfigError
from .args import Fresh, Overrides, Run, Source, positive, require

Checkpoint = Annotated[str, Positional, arg(metavar="RUN")]


def cmd_consolidate(run: Run, out: str, overwrite: bool = False):
    """Write a multi-process run's checkpoint as a single-process run folder (safetensors).

    Args:
        run: run folder or checkpoint written by torchrun
        out: new run folder
        overwrite: replace an existing --out
    """
    from ..convert.consolidate import consolidate

    path = consolidate(run, out, overwrite)
    print(f"consolidated {run} -> {path} (resume with: moelab train ... --out {out} --resume)")
    return path


def cmd_quantize(
    ckpt: Checkpoint,
    bits: int,
    out: str,
    group_size: int | None = None,
    what: Literal["experts", "all"] = "experts",
    overwrite: bool = False,
):
    """Weight-only group-wise quantization of expert (or all) weights to 8/4/3/2 bits.

    Args:
        ckpt: run folder or checkpoint
        bits: 8, 4, 3 or 2
        out: new run folder
        group_size: inputs sharing one scale and zero point; unset: 64, or the largest divisor of 64 that divides
            every quantized weight's input size
        what: the experts' weights, or every matmul weight
        overwrite: replace an existing --out
    """
    from ..compress.quantize import quantize_checkpoint

    path, before, after, group_size = quantize_checkpoint(
        ckpt, out, bits, group_size=group_size, what=what, overwrite=overwrite
    )
    print(
        f"quantized {ckpt} -> {path}: {'expert' if what == 'experts' else 'all matmul'} weights to {bits} bits "
        f"(groups of {group_size}); resident weights "
        f"{before / 2**20:,.2f} MiB -> {after / 2**20:,.2f} MiB ({after / before:.2f}x)"
    )
    return path


def _reduce(ckpt: str, out: str, n_experts: int, calib: str, method: str, max_tokens: int, overwrite: bool):
    from ..compress.experts import reduce_checkpoint

    positive(max_tokens=max_tokens)
    path, model = reduce_checkpoint(
        ckpt, out, n_experts=n_experts, calib=calib, method=method, max_tokens=max_tokens, overwrite=overwrite
    )
    assert model.cfg.moe is not None
    pc = model.cfg.param_counts()
    print(
        f"{method} {ckpt} -> {path}: {model.cfg.moe.n_experts} experts per MoE layer, top-{model.cfg.moe.top_k}, "
        f"{pc['total']:,} parameters ({pc['active']:,} active)"
    )
    return path


def cmd_prune_experts(
    ckpt: Checkpoint, keep: int, calib: str, out: str, max_tokens: int = 32768, overwrite: bool = False
):
    """Keep the E2 experts per MoE layer that add most (REAP score).

    Args:
        ckpt: run folder or checkpoint
        keep: experts to keep per MoE layer
        calib: calibration text source
        out: new run folder
        max_tokens: calibration tokens
        overwrite: replace an existing --out
    """
    return _reduce(ckpt, out, keep, calib, "prune", max_tokens, overwrite)


def cmd_merge_experts(
    ckpt: Checkpoint,
    experts: int,
    calib: str,
    out: str,
    method: Literal["frequency", "output-cluster"] = "frequency",
    max_tokens: int = 32768,
    overwrite: bool = False,
):
    """Merge each MoE layer's experts into E2 (usage-weighted averages).

    Args:
        ckpt: run folder or checkpoint
        experts: experts per MoE layer after merging
        calib: calibration text source
        out: new run folder
        method: group experts by how often they are chosen, or by what they output
        max_tokens: calibration tokens
        overwrite: replace an existing --out
    """
    return _reduce(ckpt, out, experts, calib, method, max_tokens, overwrite)


def cmd_distill(
    teacher: Annotated[str, Positional, arg(metavar="TEACHER")],
    student: str,
    data: str,
    out: str,
    overrides: Overrides = (),
    steps: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    resume: Annotated[bool, Fresh] = False,
    overwrite: Annotated[bool, Fresh] = False,
    quiet: bool = False,
):
    """Distil a teacher run into a student recipe or checkpoint on its soft targets.

    Args:
        teacher: teacher run or checkpoint
        student: student recipe/YAML, or a run/checkpoint to start from
        data: training text
        out: student run folder
        overrides: dotted overrides of the student's config (also after the options)
        steps: distillation steps
        temperature: softmax temperature of both models' logits
        alpha: weight of the LM loss (1 - alpha: the KL)
        resume: continue the distillation in --out (same settings)
        overwrite: replace an existing --out
        quiet: no progress bar
    """
    from ..compress.distill import distill

    positive(steps=steps)
    res = distill(
        teacher,
        student,
        data,
        out,
        steps=steps,
        temperature=temperature,
        alpha=alpha,
        overrides=list(overrides),
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )
    vl = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    print(f"distilled into {res.run_dir}: step {res.step}, val loss {vl}", file=sys.stderr)
    return res


def cmd_import(hf_dir: Annotated[str, Positional, arg(metavar="HF_DIR")], out: str, overwrite: bool = False):
    """Import a local Hugging Face folder (safetensors) as a moelab checkpoint folder.

    Args:
        hf_dir: folder with config.json and safetensors weights
        out: new checkpoint folder
        overwrite: replace an existing non-empty --out
    """
    from ..convert.io import import_hf

    path = import_hf(hf_dir, out, overwrite=overwrite)
    print(f"imported {hf_dir} -> {path}")
    return path


def cmd_export(
    run: Run,
    out: str,
    format: Literal["hf", "gguf"] = "hf",
    outtype: Literal["f32", "f16", "q8_0"] = "f32",
    arch: Literal["llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] | None = None,
    peft: bool = False,
    overwrite: bool = False,
):
    """Export a run or checkpoint as a Hugging Face folder that transformers loads, or a GGUF file for llama.cpp.

    Args:
        run: run folder or checkpoint
        out: new Hugging Face folder, or the .gguf file to write
        format: hf (a folder for transformers) or gguf (one file for llama.cpp)
        outtype: GGUF weight type: f32, f16 or q8_0 (norms and routers stay f32)
        arch: Hugging Face target (unset: the one that computes this model)
        peft: LoRA runs: write OUT/base and a peft adapter in OUT/adapter
        overwrite: replace an existing --out
    """
    from ..convert.export import export_run

    if peft and format != "hf":
        raise ConfigError("--peft: writes a Hugging Face base and adapter; it does not combine with --format gguf")
    done = export_run(run, out, format="peft" if peft else format, arch=arch, outtype=outtype, overwrite=overwrite)
    for note in done.notes:
        print(note, file=sys.stderr)
    print(done.summary)
    return done.path


def cmd_upcycle(
    src: Source,
    experts: int,
    top_k: int,
    out: str,
    router_init: Literal["zeros", "normal", "hidden"] = "zeros",
    noise: float = 0.0,
    drop_ratio: float = 0.0,
    granularity: int = 1,
    pattern: Literal["all", "alternate"] = "all",
    first_dense: int = 0,
    prompts: str | None = None,
    overwrite: bool = False,
):
    """Turn a dense model (HF folder or moelab run) into an MoE whose experts start as copies.

    Args:
        src: HF folder or moelab run/checkpoint of a dense model
        experts: experts per MoE layer
        top_k: experts each token is routed to
        out: new run folder
        router_init: the router's initial weights: zeros, random normal, or the hidden states of --prompts
        noise: multiplicative noise std on expert copies
        drop_ratio: Drop-Upcycling: re-initialise this share of each expert's hidden units (0..1), so copies diverge
        granularity: split each FFN into G fine-grained experts
        pattern: every layer MoE, or every other one
        first_dense: keep the first k layers dense
        prompts: text file, one prompt per expert (for --router-init hidden)
        overwrite: replace an existing non-empty --out
    """
    from ..convert.upcycle import upcycle_to_folder

    positive(experts=experts, granularity=granularity)
    require(0 < top_k <= experts, "--top-k", f"a number in 1..--experts ({experts})", top_k)
    require(noise >= 0, "--noise", "a non-negative standard deviation", noise)
    require(0 <= drop_ratio <= 1, "--drop-ratio", "a share of hidden units in 0..1", drop_ratio)
    require(first_dense >= 0, "--first-dense", "a non-negative number of layers", first_dense)
    path, moe = upcycle_to_folder(
        src,
        Path(out),
        experts,
        top_k,
        router_init=router_init,
        noise=noise,
        drop_ratio=drop_ratio,
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
