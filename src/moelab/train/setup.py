"""Setting a run up: config (lr=auto, resume checks), the process layout, data, model,
optimizer and the state of the checkpoint resumed from. The run folder is touched only
once everything it needs has loaded; in a multi-process run rank 0 prepares data first
and alone writes the folder, after every rank has checked it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import Data, prepare_data
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from ..model.transformer import compile_block
from ..parallel.checkpoint import load_distributed
from ..parallel.mesh import Parallel
from ..parallel.parallelize import parallelize, parallelize_stages
from ..parallel.pipeline import build_rank, build_schedule
from ..parallel.state import optimizer_names
from ..run_config import RunConfig, read_config, save_config
from ..runtime import check_fits, pick_device, set_cpu_threads, tune_cpu_allocator
from ..store import checkpoint as ck
from ..store.outputs import check_output, guard_output, restore, save_tokenizer, set_aside, write_json
from ..store.resume import resume_config
from ..store.run import load_model_weights
from .lr_rule import resolve_auto_lr
from .metrics import TrainingMemory, truncate_after
from .optim import build_optimizer


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as run: auto = bf16 on a CUDA device that multiplies bf16 natively
    (compute capability 8.0+, where the experts' grouped_mm runs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp32"


def autocast_ctx(cfg: RunConfig, device: torch.device):
    """bf16 autocast on the device when train.precision is (or auto resolves to) bf16, else a no-op context."""
    if resolve_precision(cfg.train.precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Run:
    """Everything the loop needs: config, folder, device, data, model, optimizer, memory
    meter, the resumed checkpoint's trainer state and the process layout (None = one)."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    data: Data
    model: Transformer
    opt: torch.optim.Optimizer
    memory: TrainingMemory
    state: dict = field(default_factory=dict)  # trainer state of the checkpoint resumed from
    par: Parallel | None = None  # the layout of a multi-process run
    # A new run's folder is undone if the run fails before its first checkpoint: the
    # folder it replaced (--overwrite, kept aside until then) comes back.
    new_folder: bool = False
    replaced: Path | None = None
    schedule: Any = None  # the pipeline schedule (parallel.pipeline > 1)
    full_groups: list[dict] | None = None  # a pipeline run's optimizer groups as one process holds them
    full_names: list[str] | None = None  # ... and its parameter names in one process's optimizer order

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (one process, or rank 0)."""
        return self.par is None or self.par.is_main

    @property
    def ckpt_root(self) -> Path:
        """RUN/checkpoints."""
        return self.run_dir / "checkpoints"


def run_data(cfg: RunConfig, tokenizer_path: str | Path | None = None) -> Data:
    """The training and validation data a run config names (source, sequence length, split,
    text field), with `tokenizer_path`'s tokenizer or one trained as the config says."""
    return prepare_data(
        cfg.data.source,
        cfg.data.seq_len,
        cfg.model.vocab_size,
        val_fraction=cfg.data.val_fraction,
        text_field=cfg.data.text_field,
        tokenizer_path=tokenizer_path,
        tokenizer_train_bytes=cfg.data.tokenizer_train_bytes,
    )


def _init_tokenizer(init_ckpt: Path) -> Path:
    """The tokenizer of the run a model is initialised from: its embeddings index those ids."""
    tok = init_ckpt.parent.parent / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(
            f"--init {init_ckpt}: its run folder has no tokenizer.json, so the token ids of its "
            "embeddings are unknown; name the tokenizer to use with data.tokenizer=PATH"
        )
    return tok


def _resolved(source: str) -> str:
    """A data source that is a file or folder, made absolute; `stdlib` and anything else (missing, a pipe) as given:
    the data layer names what is wrong with it."""
    path = Path(source)
    return str(path.resolve()) if source != "stdlib" and (path.is_file() or path.is_dir()) else source


def setup(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    init: str | None,
    data: Data | None,
    prepare_model,
    par: Parallel | None = None,
    protect: Sequence[str | Path | None] = (),
    records: dict[str, dict] | None = None,
) -> Run:
    """Prepare a run (see the module docstring) in the layout `par` (None: one process);
    raises ConfigError, CheckpointError or OutputExists before the run folder is touched.
    The run folder is never one of `protect`, the `--init` run or the data source, nor inside one;
    `records` are JSON files (name -> object) written beside config.yaml in a new run folder."""
    ckpt_root = run_dir / "checkpoints"
    main = par is None or par.is_main
    # recorded as an absolute path: `profile RUN`, `experts RUN` and `--resume` from another folder read the same data
    cfg.data.source = _resolved(cfg.data.source)
    init_ckpt = ck.resolve_checkpoint(init) if init is not None and not resume else None
    inputs = [*protect, cfg.data.source, cfg.data.tokenizer]
    if init_ckpt is not None:
        inputs += [init, init_ckpt.parent.parent]
    if cfg.optim.lr == "auto":
        _resolve_auto_lr(cfg, say=main)
    start_ckpt = None
    if resume:
        start_ckpt = ck.latest_checkpoint(ckpt_root, warn=main)
        if start_ckpt is None:
            why = (
                " (it stopped before its first one: its metrics.jsonl says why)"
                if (run_dir / "config.yaml").exists()
                else ""
            )
            raise CheckpointError(
                f"--resume: {run_dir} holds no complete checkpoint to resume from{why}; start it again with --overwrite"
            )
        saved = read_config(run_dir / "config.yaml")
        saved.data.source = _resolved(saved.data.source)  # a run recorded before sources were resolved
        cfg = resume_config(saved, cfg, run_dir)
        guard_output(run_dir, in_place=True)  # resuming adds to the run: its own config.yaml may be the recipe
    else:
        # (looked up only where the answer is shown: an existing folder without --overwrite)
        resumable = overwrite or not run_dir.is_dir() or ck.latest_checkpoint(ckpt_root, warn=False) is not None
        check_output(
            run_dir,
            overwrite=overwrite,
            protect=inputs,
            kind="run",
            hint="pass --resume to continue it or --overwrite to start over"
            if resumable
            else "it holds no checkpoint to resume (a run that stopped before its first one keeps its metrics.jsonl "
            "for the diagnosis): pass --overwrite to start over",
        )

    device = par.device if par is not None else pick_device(cfg.train.device)
    if par is None:  # (sharded layouts hold a part per rank: `moelab memory` plans them)
        check_fits(cfg.model.param_counts()["total"], 12, device, "fp32 weights, gradients and one optimizer moment")
    if device.type == "cpu":
        tune_cpu_allocator()
        # the count in force is recorded (config.yaml): it sets the matmuls' summation order, so a rerun of the
        # recorded config, or a --resume, computes the same losses to the bit on the same machine
        cfg.train.threads = set_cpu_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)  # the same on every rank: each builds the same full model

    tok_file = run_dir / "tokenizer.json"
    if data is None:
        tok_path = tok_file if resume else cfg.data.tokenizer
        if tok_path is None and init_ckpt is not None:
            tok_path = _init_tokenizer(init_ckpt)
        if par is not None and not main:
            par.barrier()  # rank 0 prepares (and caches) the dataset and tokenizer first
        data = run_data(cfg, tok_path)
        if par is not None and main:
            par.barrier()

    memory = TrainingMemory(device)  # before the model: what follows is the training state and step
    model = _build_model(cfg, device, init_ckpt, prepare_model, par)
    opt = build_optimizer(model, cfg.optim)
    run = Run(cfg, run_dir, device, data, model, opt, memory, par=par)
    if par is not None and par.layout.pipeline > 1:
        logits = torch.bfloat16 if resolve_precision(cfg.train.precision, device) == "bf16" else None
        micro = (cfg.train.batch_size // par.layout.data, cfg.data.seq_len)  # this rank's share of a micro-batch
        run.schedule = build_schedule(
            model,  # type: ignore[arg-type]
            cfg.parallel.pipeline_schedule, cfg.train.grad_accum, micro, device, logits, par.pp_group,
        )  # fmt: skip
        # a pipeline checkpoint records the optimizer's groups as one process holds them, so one process can resume it
        with torch.device("meta"):  # names and shapes only: no second copy of the weights
            whole = Transformer(cfg.model)
        whole_opt = build_optimizer(whole, cfg.optim)
        run.full_groups = whole_opt.state_dict()["param_groups"]
        run.full_names = optimizer_names(whole, whole_opt)
    if start_ckpt is not None:
        _resume_from(run, start_ckpt)
    else:  # everything loaded: only now replace (with --overwrite) or create the run folder
        if par is not None:
            par.barrier()  # every rank has checked the folder before rank 0 replaces it
        if main:
            _make_folder(run, records)
    if main:
        for stale in ckpt_root.glob(".tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
    if par is not None:
        par.barrier()
    return run


def _resolve_auto_lr(cfg: RunConfig, say: bool) -> None:
    """optim.lr=auto becomes a number (the lr-fit's, else MM1's rule), said once."""
    cfg.optim.lr = resolve_auto_lr(cfg)
    rule = f"the fit in {cfg.optim.lr_fit}" if cfg.optim.lr_fit else "MM1's rule over non-embedding parameters"
    if say:
        n = cfg.model.param_counts()["non_embedding"]
        print(f"optim.lr=auto -> {cfg.optim.lr:.4g} ({rule}, N={n:,})", file=sys.stderr)


def _build_model(cfg: RunConfig, device, init_ckpt: Path | None, prepare_model, par: Parallel | None) -> Transformer:
    """The model on `device`: --init weights loaded, the caller's preparation (fine-tuning
    freezes, LoRA) applied, then parallelized or compiled as configured."""
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if init_ckpt is not None:
        load_model_weights(model, init_ckpt)
    if prepare_model is not None:
        prepare_model(model)
    if par is not None and par.layout.pipeline > 1:
        # this rank's stages only; the rest of the model is dropped with `model`
        stages = build_rank(
            model, par.layout.pipeline, cfg.parallel.virtual_stages, par.layout.pp_rank, cfg.parallel.pipeline_split
        )
        if par.layout.data > 1:
            parallelize_stages(stages, par)
        return stages
    if par is not None:
        parallelize(model, par, compile_blocks=cfg.train.compile)
    elif cfg.train.compile:
        for block in model.layers:
            compile_block(block)
    return model


def _resume_from(run: Run, ckpt: Path) -> None:
    """Load weights, optimizer, RNG and trainer state of `ckpt` (either form); drop the
    metrics lines logged after it."""
    run.state = ck.check_checkpoint(ckpt)
    if run.par is not None:
        load_distributed(ckpt, run.model, run.opt, run.par, names=run.full_names)
    else:
        load_model_weights(run.model, ckpt)
        names = optimizer_names(run.model, run.opt)
        ck.load_optimizer(run.opt, ck.optimizer_state(ckpt, names), run.state["param_groups"])
    ck.restore_rng(ck.load_tensors(ckpt, "rng.safetensors"))
    if run.is_main:
        truncate_after(run.run_dir / "metrics.jsonl", run.state["step"])


def _make_folder(run: Run, records: dict[str, dict] | None) -> None:
    """Create the new run's folder (an existing one set aside until the first checkpoint):
    tokenizer, config and `records`; on failure the folder set aside comes back."""
    run.new_folder = True
    run.replaced = set_aside(run.run_dir)
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(run.data.tokenizer, run.run_dir / "tokenizer.json")
        save_config(run.cfg, run.run_dir / "config.yaml")
        for name, record in (records or {}).items():
            write_json(run.run_dir / name, record)
    except BaseException:
        restore(run.run_dir, run.replaced)
        raise
