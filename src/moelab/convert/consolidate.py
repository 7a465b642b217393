"""`moelab consolidate`: a multi-process run's checkpoint as a single-process run folder
(single-file safetensors for the weights, the optimizer and the RNG), for tools that want
files rather than a DCP folder. Every moelab command already reads DCP checkpoints
directly; this writes the same state out once, without pickle and without a process
group, and the result resumes with `moelab train --resume` like any one-process run."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ConfigError
from ..model import Transformer
from ..parallel.state import optimizer_names
from ..run_config import read_config
from ..store import checkpoint as ck
from ..store.outputs import check_output, staged_output
from ..store.run import load_model_weights
from ..train.optim import build_optimizer

# written by the checkpoint itself, or describing the DCP form
_NOT_CARRIED = ("files", "format", "layout", "step", "param_groups")


def consolidate(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write SRC's latest good (or named) distributed checkpoint into the run folder OUT as
    a single-process checkpoint, with SRC's config, tokenizer and metrics; returns the
    new checkpoint's path. ConfigError when SRC is already single-process."""

    check_output(out, overwrite=overwrite, protect=[src], kind="run")  # before the checkpoint is read: fail in seconds
    ckpt = ck.resolve_checkpoint(src)
    if not ck.is_distributed(ckpt):
        raise ConfigError(f"{ckpt} is already a single-process checkpoint (model.safetensors): nothing to do")
    run_dir = ckpt.parent.parent
    state = ck.check_checkpoint(ckpt)
    cfg = read_config(run_dir / "config.yaml")
    model = Transformer(cfg.model)
    load_model_weights(model, ckpt)
    opt = build_optimizer(model, cfg.optim)
    ck.load_optimizer(opt, ck.optimizer_state(ckpt, optimizer_names(model, opt)), state["param_groups"])
    trainer_state = {k: v for k, v in state.items() if k not in _NOT_CARRIED}
    with staged_output(out, overwrite=overwrite, protect=[src, run_dir], kind="run") as tmp:
        for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        mine = ck.rng_tensors()
        ck.restore_rng(ck.load_tensors(ckpt, "rng.safetensors"))  # save_checkpoint records the RNG in force
        try:
            ck.save_checkpoint(tmp / "checkpoints", int(state["step"]), model, opt, trainer_state)
        finally:
            ck.restore_rng(mine)
    return Path(out) / "checkpoints" / ckpt.name


__all__ = ["consolidate"]
