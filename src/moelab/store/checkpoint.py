"""Atomic checkpoints in safetensors + JSON (never pickle).

RUN/checkpoints/step-NNNNNN/
  model.safetensors       model weights and persistent buffers (router biases)
  optimizer.safetensors   AdamW moments and step counts (Muon: momentum), keyed state.<param index>.<name>
  rng.safetensors         torch CPU (and CUDA) generator states
  trainer_state.json      step, data position, health history, param-group settings,
                          and the files above with their sizes and SHA-256 (written last)

A multi-process run writes `dcp/` (torch.distributed.checkpoint: every rank its part,
keys `model.<name>` and `optim.<name>.<state>`, see moelab.parallel.state) instead of
the model and optimizer files, and `"format": "dcp"` in trainer_state.json. Either form
loads under any layout: `model_tensors` gives a DCP checkpoint's weights whole, without
a process group, so eval, export, generate, finetune and upcycle read both.

A checkpoint is written into a temporary folder and renamed into place, so a crash
mid-write leaves the previous checkpoint as the latest complete one. A checkpoint whose
weights or optimizer moments are not finite is never written. Reading checks sizes
(cheap, for listing) and, for the checkpoint actually used, the checksums, so a damaged
file is found whether it was cut short or corrupted inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, NonFiniteError
from .dcp import by_index, read_full
from .outputs import write_safetensors

STATE_FILE = "trainer_state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")  # a single-process checkpoint


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path, require_finite: bool = False) -> None:
    if require_finite:
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"refusing to write {path.name}: non-finite values in {bad[:5]}")
    write_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors (keyed state.<param index>.<name>) and its param-group settings (JSON-
    ready)."""
    sd = opt.state_dict()
    tensors = {
        f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
        for i, st in sd["state"].items()
        for k, v in st.items()
    }
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore an optimizer from the tensors and param groups written by `optimizer_tensors`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch CPU generator state and each CUDA device's, as tensors."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore the generator states saved by `rng_tensors`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer | None,
    trainer_state: dict,
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically into CKPT_ROOT/step-NNNNNN (model, optimizer, RNG, trainer state with sizes
    and SHA-256), keeping the newest `keep`; returns its path. Raises NonFiniteError, writing nothing, when weights
    or optimizer moments are not finite."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save(model.state_dict(), tmp / "model.safetensors", require_finite=True)
        opt_tensors, groups = optimizer_tensors(opt) if opt is not None else ({}, [])
        _save(opt_tensors, tmp / "optimizer.safetensors", require_finite=True)
        _save(rng_tensors(), tmp / "rng.safetensors")
        return commit_checkpoint(tmp, final, dict(trainer_state, param_groups=groups), keep)
    except BaseException:  # a full disk mid-write: the earlier checkpoints stay the newest
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_checkpoint(tmp: Path, final: Path, trainer_state: dict, keep: int | None) -> Path:
    """Finish a checkpoint written into `tmp`: trainer_state.json with the size and
    SHA-256 of every file in it (written last, fsynced), then the rename to `final`
    that makes it visible, then pruning to the newest `keep`."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    state = dict(
        trainer_state,
        step=int(final.name.split("-")[-1]),
        files={str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
    )
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. stop-after at a checkpoint step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if keep:
        for old in complete_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_checkpoint(path: Path, verify: bool = True) -> dict:
    """The trainer state of a complete checkpoint; CheckpointError naming what is wrong.
    `verify` also compares each file's SHA-256 with the manifest (reads every byte)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is truncated or not JSON") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a JSON object")
    for name, info in state.get("files", {}).items():
        info = info if isinstance(info, dict) else {"bytes": info}  # manifests before checksums
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated ({f.stat().st_size} of {info['bytes']} bytes)"
            )
        if verify and "sha256" in info and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupted (its SHA-256 differs from the manifest)")
    return state


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoints whose files are all present at their recorded sizes, oldest first."""
    out = []
    for p in sorted(Path(ckpt_root).glob("step-*")):
        try:
            check_checkpoint(p, verify=False)
            out.append(p)
        except CheckpointError:
            pass
    return out


def latest_checkpoint(ckpt_root: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes every check (checksums included). Newer ones that
    fail are named on stderr with the reason, so eval and resume never fall back silently;
    None when there is none."""
    for p in sorted(Path(ckpt_root).glob("step-*"), reverse=True):
        try:
            check_checkpoint(p)
            return p
        except CheckpointError as e:
            if warn:
                print(f"warning: skipping damaged {e}", file=sys.stderr)
    return None


def is_distributed(ckpt: Path) -> bool:
    """Whether a checkpoint was written by a multi-process run (DCP form)."""
    return (Path(ckpt) / "dcp" / ".metadata").is_file()


def model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights and persistent buffers, whole, by single-process name, from
    either form (a DCP checkpoint is consolidated in memory, no pickle, no process group)."""
    if is_distributed(ckpt):
        try:
            return read_full(Path(ckpt) / "dcp", "model.")
        except Exception as e:  # DCP raises its own wrappers (CheckpointException) for unreadable shards
            raise CheckpointError(f"checkpoint {ckpt}: cannot read dcp/ ({type(e).__name__}: {e})") from None
    return load_tensors(ckpt, "model.safetensors")


def optimizer_state(ckpt: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's optimizer tensors keyed state.<index>.<name> as `load_optimizer`
    takes them; `names` are the parameters' names in the optimizer's order."""
    if not is_distributed(ckpt):
        return load_tensors(ckpt, "optimizer.safetensors")

    return by_index(read_full(Path(ckpt) / "dcp", "optim."), names)


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of a checkpoint; CheckpointError naming it when unreadable."""
    try:
        return load_file(str(Path(path) / name))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {name} ({e})") from None


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A run folder means its latest complete checkpoint; a step folder means itself."""
    p = Path(run_or_ckpt)
    if not p.exists():
        raise CheckpointError(f"'{p}' does not exist (expected a run folder or a checkpoint folder)")
    if (p / STATE_FILE).exists() or (p / "model.safetensors").exists():
        if (p / "config.json").is_file() and not (p / STATE_FILE).exists():
            raise CheckpointError(
                f"'{p}' is a Hugging Face model folder: run `moelab import {p} --out RUN` first, then use RUN"
            )
        check_checkpoint(p)
        return p
    latest = latest_checkpoint(p / "checkpoints")
    if latest is None:
        if (p / "config.json").is_file():
            raise CheckpointError(
                f"'{p}' is a Hugging Face model folder: run `moelab import {p} --out RUN` first, then use RUN"
            )
        raise CheckpointError(f"'{p}' holds no complete checkpoint (looked in {p / 'checkpoints'})")
    steps = sorted(Path(p / "checkpoints").glob("step-*"))
    if steps and steps[-1] != latest:
        print(f"using {latest} (newer checkpoints are damaged)", file=sys.stderr)
    return latest
