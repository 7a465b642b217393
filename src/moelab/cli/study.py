"""Commands that run many trainings or prepare data for them: compare, lr-sweep, lr-fit,
finetune, finetune-report, tokenize (torch imported inside each, as in cli.run)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import Positional, UseAppendAction, arg

from ..errors import ConfigError
from .args import INVOCATION, Budget, Overrides, Run, SetEach, Source, number_list, positive, require

FinetuneRecipe = Literal["full", "freeze-experts", "freeze-router", "experts-only", "lora"]


def cmd_compare(
    items: Annotated[tuple[str, ...], Positional, arg(metavar="RECIPE_OR_RUN")],
    out: str,
    data: str | None = None,
    steps: Annotated[int | None, Budget] = None,
    tokens: Annotated[int | None, Budget] = None,
    overrides: SetEach = (),
    seeds: int = 1,
    jobs: int = 1,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Train recipes (or read finished runs) on the same data and budget; write report.html and summary.json.

    Args:
        items: recipes to train, or finished run folders to read; RECIPE+KEY=VALUE[+KEY=VALUE...] gives a recipe
            overrides of its own (after --set), its run named so: tiny-moe tiny-moe+optim.muon_experts=dion
        out: report folder
        data: training data for recipes; unset: each recipe's (stdlib)
        steps: training steps per recipe
        tokens: token budget per recipe (steps derived per recipe)
        overrides: override applied to every recipe (repeatable)
        seeds: train each recipe with this many seeds (init and data order); 2 or more: the verdict is the 95%
            interval of the loss difference, paired by seed
        jobs: trainings run side by side, each on an equal share of the cores (tokens/s and seconds are then
            measured under that sharing; losses are not affected)
        overwrite: replace an existing --out once the new report is done
        quiet: no progress bars
    """
    from ..analysis.studies.compare import compare

    require(len(items) > 0, "RECIPE_OR_RUN", "at least one recipe or run", list(items))
    summary = compare(
        list(items), data, Path(out), steps=steps, tokens=tokens, overrides=list(overrides), quiet=quiet,
        overwrite=overwrite, seeds=seeds, jobs=jobs,
    )  # fmt: skip
    print(f"report: {Path(out) / 'report.html'}\nsummary: {Path(out) / 'summary.json'}")
    for line in summary["summary"]:
        print("- " + line)
    return summary


def cmd_lr_sweep(
    recipe: str,
    sizes: str,
    lrs: str,
    out: str,
    data: str | None = None,
    steps: Annotated[int | None, Budget] = None,
    tokens_per_param: Annotated[float | None, Budget] = None,
    overrides: SetEach = (),
    quiet: bool = False,
):
    """Grid-search the peak LR at several model sizes (resumable).

    Args:
        recipe: recipe or YAML whose d_model is varied
        sizes: comma-separated d_model values, e.g. 64,128,256
        lrs: comma-separated peak LRs, e.g. 1e-3,3e-3,1e-2
        out: sweep folder (rerun the same command to resume it)
        data: training data; unset: the recipe's
        steps: training steps per run
        tokens_per_param: steps = T * non-embedding params / tokens per step
        overrides: override applied to every run (repeatable)
        quiet: no progress bars
    """
    from ..analysis.studies.lr_sweep import lr_sweep

    positive(steps=steps, tokens_per_param=tokens_per_param)
    rows = lr_sweep(
        recipe,
        sizes=number_list(sizes, int, "--sizes"),
        lrs=number_list(lrs, float, "--lrs"),
        data=data,
        out=Path(out),
        steps=steps,
        tokens_per_param=tokens_per_param,
        overrides=list(overrides),
        quiet=quiet,
    )
    print(f"{len(rows)} runs in {Path(out) / 'sweep.jsonl'}; fit them with: moelab lr-fit {out}")
    return rows


def cmd_lr_fit(
    sweep_dir: Annotated[str, Positional, arg(metavar="SWEEP")],
    target_params: float | None = None,
    count: Literal["non-embedding", "active", "total"] = "non-embedding",
):
    """Fit log(lr*) = a log(N) + b on a sweep and predict the LR for a target size.

    Args:
        sweep_dir: folder written by `moelab lr-sweep`
        target_params: predict the LR for a model of this many parameters
        count: which parameters N counts
    """
    from ..analysis.studies.lr_scaling import fit_sweep

    positive(target_params=target_params)
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


def cmd_finetune(
    run: Run,
    data: str,
    out: str,
    recipe: FinetuneRecipe,
    overrides: Overrides = (),
    steps: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Fine-tune a run or checkpoint on chat / prompt-completion data with a recipe.

    Args:
        run: run folder or checkpoint to start from
        data: stdlib-docstrings, or a .jsonl with messages or prompt/completion
        out: new run folder
        recipe: what trains: everything, all but the experts, all but the router, only the experts, LoRA adapters
        overrides: dotted config overrides of the fine-tune, e.g. optim.lr=1e-4 (also after the options)
        steps: fine-tuning steps
        overwrite: replace an existing --out
        quiet: no progress bar
    """
    from ..finetune.run import finetune

    positive(steps=steps)
    return finetune(run, data, out, recipe, steps=steps, overrides=list(overrides), overwrite=overwrite, quiet=quiet)


def cmd_finetune_report(
    out: str,
    bases: str = "small-dense,small-moe",
    data: str = "stdlib-docstrings",
    pretrain_data: str = "stdlib",
    pretrain_steps: int | None = None,
    steps: int = 100,
    train_examples: int = 400,
    lr: float = 1e-3,
    lora_lr: float = 3e-3,
    batch_size: int = 16,
    overrides: SetEach = (),
    ft_overrides: Annotated[tuple[str, ...], arg(name="ft-set", metavar="KEY=VALUE"), UseAppendAction] = (),
    doc: str | None = None,
    quiet: bool = False,
):
    """Pretrain dense and MoE bases, fine-tune each with every recipe, report train vs held-out loss.

    Args:
        out: report folder
        bases: comma-separated recipes to pretrain
        data: fine-tuning data
        pretrain_data: pretraining data
        pretrain_steps: pretraining steps; unset: each recipe's train.steps
        steps: fine-tuning steps per variant
        train_examples: seeded sample of training examples
        lr: peak LR of full and partial fine-tunes
        lora_lr: peak LR of LoRA fine-tunes
        batch_size: fine-tuning sequences per step
        overrides: override for pretraining (repeatable)
        ft_overrides: override for every fine-tune (repeatable)
        doc: markdown file whose report section is replaced (e.g. docs/finetuning.md)
        quiet: no progress bars
    """
    from ..analysis.studies.finetune_report import markdown, run_report

    positive(pretrain_steps=pretrain_steps, steps=steps, train_examples=train_examples, lr=lr, lora_lr=lora_lr)
    positive(batch_size=batch_size)
    res = run_report(
        Path(out),
        [b.strip() for b in bases.split(",") if b.strip()],
        data=data,
        pretrain_data=pretrain_data,
        pretrain_steps=pretrain_steps,
        pretrain_overrides=list(overrides),
        steps=steps,
        train_examples=train_examples,
        lr=lr,
        lora_lr=lora_lr,
        batch_size=batch_size,
        ft_overrides=list(ft_overrides),
        doc=Path(doc) if doc else None,
        command=shlex.join(["moelab", *INVOCATION]),  # recorded in the report, to rerun it
        quiet=quiet,
    )
    print(markdown(res, f"{out}/heldout_loss.png"))
    return res


def cmd_tokenize(
    src: Source,
    out: str,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    tokenizer_train_bytes: int = 10_000_000,
    chunk_bytes: int = 64 << 20,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Tokenize a source once into memory-mapped token shards (train with --data DATASET).

    Args:
        src: stdlib, a text file, a folder, a .jsonl, a .parquet, a .gz/.zst of those, or a datasets folder
            (save_to_disk)
        out: dataset folder (rerun the same command to resume a killed run)
        tokenizer: a run folder or a tokenizer.json; unset: train one on the training split
        vocab_size: when training a tokenizer
        val_fraction: share of documents held out (by name hash)
        text_field: .jsonl field / .parquet or datasets column
        tokenizer_train_bytes: train the tokenizer on at most this much text
        chunk_bytes: source text per shard pair: the unit a killed run resumes from
        overwrite: replace a folder holding another dataset
        quiet: no progress bar
    """
    from ..data import tokenize_source, training_texts
    from ..data.dataset import resumable_tokenizer
    from ..data.tokenizer import train_tokenizer
    from ..store.outputs import guard_output
    from ..store.run import load_tokenizer

    require(0 < val_fraction < 1, "--val-fraction", "a number in (0, 1)", val_fraction)
    require(vocab_size >= 260, "--vocab-size", "at least 260 (256 bytes and the special tokens)", vocab_size)
    positive(tokenizer_train_bytes=tokenizer_train_bytes, chunk_bytes=chunk_bytes)
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


def cmd_scaling(
    folder: Annotated[str | None, Positional, arg(metavar="DIR")] = None,
    dense: str | None = None,
    moe: str | None = None,
    data: str | None = None,
    out: str | None = None,
    widths: str | None = None,
    tokens: str | None = None,
    experts: str | None = None,
    seeds: int = 1,
    jobs: int = 1,
    predict: str | None = None,
    overrides: SetEach = (),
    quiet: bool = False,
):
    """Fit loss laws for dense and MoE on a grid of small runs; the MoE's efficiency leverage with intervals.

    `moelab scaling --dense R --moe R --out DIR --widths ... --tokens ...` trains the grid (rerun it to resume, or
    with more widths, budgets or seeds to grow it) and writes DIR/report.html and DIR/scaling.json; `moelab scaling
    DIR` refits a finished grid; `moelab scaling DIR --predict WIDTH,TOKENS` prints each family's predicted loss
    outside the grid, then trains it and compares.

    Args:
        folder: a scaling folder to refit, or to check with --predict
        dense: dense recipe (or YAML) whose d_model is varied
        moe: MoE recipe (or YAML) whose d_model is varied
        data: training data for both; unset: each recipe's
        out: scaling folder to create, or to continue: the same flags resume it, more widths, tokens or seeds grow
            it (its finished runs kept)
        widths: comma-separated d_model values, e.g. 32,48,64,96
        tokens: comma-separated training-token budgets, e.g. 100000,200000,400000
        experts: comma-separated expert counts, e.g. 4,8,16: one MoE family each, at the recipe's active and total
            parameters (top-k and expert width scaled), fitted as one law over granularity
        seeds: seeds per grid point (train.seed=0..N-1)
        jobs: trainings at once, each in a process of its own with an equal share of the cores
        predict: WIDTH,TOKENS outside the grid: predicted, then trained and measured
        overrides: override applied to every run (repeatable)
        quiet: no progress bars
    """
    from ..analysis.studies.scaling.fit import fit_scaling
    from ..analysis.studies.scaling.grid import Grid, scaling_grid
    from ..analysis.studies.scaling.predict import predict_and_check
    from ..analysis.studies.scaling.report import write_report

    if folder is not None:
        given = [f for f, v in (("--dense", dense), ("--moe", moe), ("--data", data), ("--out", out),
                                ("--widths", widths), ("--tokens", tokens), ("--experts", experts),
                                ("--set", overrides)) if v]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)}: not taken with DIR (the grid is the folder's: {folder}/grid.json)")
        require(seeds == 1 and jobs == 1, "--seeds/--jobs", "their defaults with DIR", f"{seeds}/{jobs}")
        if predict is not None:
            point = number_list(predict, int, "--predict")
            require(len(point) == 2 and min(point) > 0, "--predict", "WIDTH,TOKENS (two positive integers)", predict)
            return predict_and_check(Path(folder), point[0], point[1])
        summary = fit_scaling(Path(folder))
    else:
        missing = [f for f, v in (("--dense", dense), ("--moe", moe), ("--out", out), ("--widths", widths),
                                  ("--tokens", tokens)) if not v]  # fmt: skip
        if missing:
            raise ConfigError(f"{', '.join(missing)}: needed to train a grid (or give a scaling folder as DIR)")
        require(predict is None, "--predict", "a finished scaling folder as DIR", predict)
        positive(seeds=seeds, jobs=jobs)
        grid = Grid(
            dense=dense,  # type: ignore[arg-type]
            moe=moe,  # type: ignore[arg-type]
            data=data,
            widths=tuple(number_list(widths, int, "--widths")),  # type: ignore[arg-type]
            tokens=tuple(number_list(tokens, int, "--tokens")),  # type: ignore[arg-type]
            seeds=seeds,
            overrides=tuple(overrides),
            experts=tuple(number_list(experts, int, "--experts")) if experts else (),
        )
        folder = str(out)
        rows = scaling_grid(grid, Path(folder), jobs=jobs, quiet=quiet)
        print(f"{len(rows)} runs in {Path(folder) / 'runs.jsonl'}")
        summary = fit_scaling(Path(folder))
    laws = summary["laws"] | ({"MoE over G": summary["granular_law"]} if "granular_law" in summary else {})
    for name, law in laws.items():
        fixed = f" ({'; '.join(law['fixed'])} fixed at the prior)" if law["fixed"] else ""
        size = f"({law['A']:.3g} + {law['g']:.3g}/G^{law['gamma']:.3f})" if "g" in law else f"{law['A']:.3g}"
        print(
            f"{name}: L = {law['E']:.3f} + {size}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f}"
            f"   rms residual {100 * law['rms_log']:.2f}%{fixed}"
        )
    for s in summary.get("notes", []) + summary["sentences"]:
        print(s[0].upper() + s[1:])
    print(f"report: {write_report(Path(folder), summary)}")
    return summary
