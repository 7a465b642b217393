"""Atomic checkpoints in safetensors + JSON (never pickle).

RUN/checkpoints/step-NNNNNN/
  model.safetensors       model weights and persistent buffers (router biases)
  optimizer.safetensors   AdamW moments and step counts, keyed state.<param index>.<name>
  rng.safetensors         torch CPU (and CUDA) generator states
  trainer_state.json      step, data position, health history, param-group settings,
                          and the list of files above with their sizes (written last)

A checkpoint is written into a temporary folder and renamed into place, so a crash
mid-write leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    trainer_state: dict, keep: int | None = None) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save(model.state_dict(), tmp / "model.safetensors")
    opt_tensors, groups = optimizer_tensors(opt) if opt is not None else ({}, [])
    _save(opt_tensors, tmp / "optimizer.safetensors")
    _save(rng_tensors(), tmp / "rng.safetensors")
    state = dict(trainer_state, step=step, param_groups=groups,
                 files={f: (tmp / f).stat().st_size for f in FILES})
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. stop-after at a checkpoint step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    if keep:
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_checkpoint(path: Path) -> dict:
    """The trainer state of a complete checkpoint; CheckpointError naming what is wrong."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is truncated or not JSON") from None
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated "
                                  f"({f.stat().st_size} of {size} bytes)")
    return state


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    out = []
    for p in sorted(Path(ckpt_root).glob("step-*")):
        try:
            check_checkpoint(p)
            out.append(p)
        except CheckpointError:
            pass
    return out


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
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
        check_checkpoint(p)
        return p
    latest = latest_checkpoint(p / "checkpoints")
    if latest is None:
        raise CheckpointError(f"'{p}' holds no complete checkpoint (looked in {p / 'checkpoints'})")
    return latest
