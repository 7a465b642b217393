"""Distributed checkpoints: the same folder, atomicity and manifest as one process's,
with the weights and optimizer state in a DCP folder that every rank writes its part of.

Order: rank 0 makes the hidden temporary folder; all ranks check their shares are finite
(agreeing by all-reduce, so all refuse together) and write `dcp/`; rank 0 adds the RNG
state and the manifest and renames the folder into place. A save killed at any point
leaves only the temporary folder, which no reader lists and the next run deletes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import CheckpointError, NonFiniteError
from ..runtime import is_dtensor
from ..store import checkpoint as ck
from ..store.dcp import by_name
from ..store.outputs import probe_write
from .mesh import Parallel
from .state import fill_state, optimizer_names, training_state


def save_distributed(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    trainer_state: dict,
    par: Parallel,
    keep: int | None = None,
    groups: list[dict] | None = None,
) -> Path:
    """Write checkpoint `step` from every rank (a collective); returns its path. Raises
    NonFiniteError on every rank, writing nothing, if any rank's share is not finite.
    `groups`: the optimizer's param groups to record when rank 0's are not the whole
    model's (a pipeline rank holds only its stages)."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    if par.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    state = training_state(model, opt, par)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(_finite(v))]
    flag = torch.tensor([float(len(bad))], device=par.device)
    dist.all_reduce(flag)
    if flag.item() > 0:
        par.barrier()
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise NonFiniteError(
            f"refusing to write checkpoint step {step}: non-finite values in {bad[:5] or 'another rank'}"
        )
    par.barrier()  # the folder exists before anyone writes into it
    import torch.distributed.checkpoint as dcp  # here: a second of start-up for commands that never save one

    try:
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    except dcp.api.CheckpointException as e:  # every rank raises it, holding every rank's failure
        reason = _first_os_error(e) or probe_write(ckpt_root)
        par.barrier()  # every rank has probed before the partial folder goes (freeing space)
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise reason or e from None
    par.barrier()
    if par.is_main:
        ck._save(ck.rng_tensors(), tmp / "rng.safetensors")
        if groups is None:
            groups = opt.state_dict()["param_groups"]
        else:  # the settings in force now (lr, ...) on the whole model's groups
            now = {g["name"]: g for g in opt.state_dict()["param_groups"]}
            groups = [g | {k: v for k, v in now.get(g["name"], {}).items() if k != "params"} for g in groups]
        layout = vars(par.layout)
        ck.commit_checkpoint(tmp, final, dict(trainer_state, format="dcp", param_groups=groups, layout=layout), keep)
    par.barrier()
    return final


def _first_os_error(e: BaseException) -> OSError | None:
    """The first OSError (a full disk, a read-only folder) among a DCP save's failures: the
    one line every rank reports instead of DCP's nested tracebacks."""
    for failure in getattr(e, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, OSError):
            return exc
    return None


def _finite(t: torch.Tensor) -> torch.Tensor:
    local = t.to_local() if is_dtensor(t) else t
    return torch.isfinite(local).all()


def load_distributed(
    ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, par: Parallel, names: list[str] | None = None
) -> None:
    """Load a checkpoint of either form into this rank's shares of the weights and
    optimizer state (a collective): DCP reads the chunks it needs, a single-process
    checkpoint is read whole and each rank keeps its chunk. `names`: the parameter names
    in one process's optimizer order, when this rank's optimizer holds only some (a
    pipeline rank)."""
    state = training_state(model, opt, par)
    if ck.is_distributed(ckpt):
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
        except Exception as e:  # DCP wraps per-rank failures in its own exception types
            raise CheckpointError(f"checkpoint {ckpt} does not fit this model ({type(e).__name__}: {e})") from None
        return
    full = {"model." + k: v for k, v in ck.load_tensors(ckpt, "model.safetensors").items()}
    optim = by_name(ck.load_tensors(ckpt, "optimizer.safetensors"), names or optimizer_names(model, opt))
    full.update({"optim." + k: v for k, v in optim.items()})
    missing = [k for k in state if k not in full]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: missing {missing[:5]}")
    fill_state(state, full)
