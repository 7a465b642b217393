"""The multi-process checkpoint form (a `torch.distributed.checkpoint` folder) as the
store reads it: optimizer keys between the DCP form (`<name>.<state>`) and the
single-file form (`state.<index>.<state>`), and a DCP folder read whole in one process.
Writing one, and loading into sharded tensors, is `moelab.parallel`'s (it needs the
process group)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def by_index(optim_by_name: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """`<name>.<state>` keys (the DCP form) as `state.<index>.<state>` (the safetensors
    form, `names` in the optimizer's order); `by_name` is the inverse."""
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for key, v in optim_by_name.items():
        name, what = key.rsplit(".", 1)
        out[f"state.{index[name]}.{what}"] = v
    return out


def by_name(optim_by_index: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """`state.<index>.<state>` keys as `<name>.<state>`: the inverse of `by_index`."""
    out = {}
    for key, v in optim_by_index.items():
        _, i, what = key.split(".", 2)
        out[f"{names[int(i)]}.{what}"] = v
    return out


def read_full(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` in a DCP folder, whole, read in this process alone
    (no process group): how one process reads a checkpoint written by many."""

    import torch.distributed.checkpoint as dcp  # here: a second of start-up for commands that never read one
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # one process reading a many-process checkpoint is this function's purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix) :]: v for k, v in out.items()}
