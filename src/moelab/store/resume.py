"""The one resume guard: a command continues saved work (a run, a distillation, an LR
sweep) only with the settings it was started with; each differing key is named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run_config import RunConfig

# Settings a resumed run may change: the horizon, and how it logs, evaluates, checkpoints
# and watches itself. Everything else would make the resumed run a different run.
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.device",
    "train.spike_factor",
    "train.spike_window",
    "train.collapse_max_violation",
    "train.collapse_window",
    "train.on_nonfinite",
    "train.max_skipped_steps",
    "train.precision",
    "train.compile",
    "parallel.expert",  # checkpoints reshard: a run may resume on another layout
    "parallel.data_shard",
    "parallel.data_replicate",
    "parallel.pipeline",
    "parallel.pipeline_schedule",
    "parallel.virtual_stages",
    "parallel.pipeline_split",
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def settings_diff(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf of two nested dicts that differs, keys sorted."""
    fa, fb = _flat(a), _flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if k not in ignore and fa.get(k) != fb.get(k)]


def config_diff(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every field that differs, keys sorted."""
    return settings_diff(a.to_dict(), b.to_dict(), ignore)


def refuse_changed_settings(
    saved: dict,
    command: dict,
    where: Path,
    *,
    may_change: str,
    ignore: tuple[str, ...] = (),
    flag: str = "--resume",
    noun: str = "run",
) -> None:
    """The one resume guard: a command continues saved work only with the settings it was
    started with; ConfigError naming each differing key otherwise (`ignore`: keys that may change)."""
    diff = settings_diff(saved, command, ignore)
    if diff:
        shown = "; ".join(f"{k}: {noun} has {va!r}, command has {vb!r}" for k, va, vb in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise ConfigError(
            f"{flag}: the command differs from the settings saved in {where}: {shown}{more}. "
            f"Continue with the same settings ({may_change}), or start anew in another folder"
        )


def resume_config(saved: RunConfig, command: RunConfig, run_dir: Path) -> RunConfig:
    """The config a resumed run continues with: the saved one, with the RESUMABLE fields
    taken from the command. Any other difference is refused, naming each key."""
    refuse_changed_settings(
        saved.to_dict(),
        command.to_dict(),
        run_dir / "config.yaml",
        ignore=RESUMABLE,
        may_change="same recipe, --data and overrides; only the --steps horizon and "
        "train.log_every/eval_every/ckpt_every-style settings may change",
    )
    out = copy.deepcopy(saved)
    for key in RESUMABLE:
        section, name = key.split(".")
        value = getattr(getattr(command, section), name)
        if value is not None:  # not given (train.threads unset): the run's own, as recorded
            setattr(getattr(out, section), name, value)
    out.validate()
    return out
