"""`moelab scaling`'s training grid: each family (dense, MoE) at every width x token budget x
seed, one short run each, resumable. OUT/runs.jsonl gets one row per finished run; a killed
grid continues where it stopped (finished runs are skipped, a half-finished one resumes
from its checkpoint). A grid may grow - more widths, token budgets or seeds, so a fit can be
made trustworthy along the axis it missed without training its runs again - but a grid
continued with any other setting changed (recipes, data, overrides) is refused.

A width is a d_model: the recipe's model is scaled as `lr-sweep` scales it (head dim kept,
FFN and expert widths in proportion, depth by the aspect ratio). Each run's peak LR is
`optim.lr=auto` (MM1's rule at its size, or `optim.lr_fit`) unless --set names one.

With `experts` the MoE family is several: the recipe with E experts for each E given, top-k
and expert width scaled so that active and total parameters stay the recipe's (E twice the
recipe's: top-k doubled, experts half as wide) - granularity as a variable at fixed
parameters (Krajewski et al. 2024).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ....config import MoEConfig
from ....errors import ConfigError, NonFiniteError, OutputExists
from ....run_config import RunConfig, load_config, save_config
from ....runtime import PARENT_ENV
from ....store.checkpoint import latest_checkpoint
from ....store.outputs import guard_output, removed_on_failure, write_json
from ....store.resume import refuse_changed_settings
from ....train import train
from ..curves import read_run
from ..lr_scaling import scale_model

DIVERGED = 3  # the exit code of a point trained apart whose loss went non-finite
SETTINGS_FILE = "grid.json"  # the grid a folder was started with, compared when it is continued
ROWS_FILE = "runs.jsonl"
FAMILIES = ("dense", "moe")
GROWS = ("widths", "tokens", "seeds")  # what a continued grid may add to; every other setting is the grid's
COUNT = "active_non_embedding"  # the law's N: what a token's compute touches


@dataclass(frozen=True)
class Grid:
    """What `moelab scaling` trains: two recipes, their data, widths x token budgets x seeds."""

    dense: str
    moe: str
    data: str | None
    widths: tuple[int, ...]
    tokens: tuple[int, ...]
    seeds: int = 1
    overrides: tuple[str, ...] = ()
    experts: tuple[int, ...] = ()  # MoE variants by expert count; () = the recipe's own

    def recipe(self, family: str) -> str:
        """The recipe of `family` ('dense', 'moe' or an 'moe-e16' variant)."""
        return self.dense if family == "dense" else self.moe

    @property
    def families(self) -> tuple[str, ...]:
        """'dense' and the MoE family, or one MoE family per expert count."""
        return ("dense", *(variant_name(e) for e in self.experts)) if self.experts else FAMILIES

    def points(self) -> list[tuple[str, int, int, int]]:
        """Every (family, width, tokens, seed), smallest first."""
        return [(f, w, t, s) for t in self.tokens for w in self.widths for f in self.families
                for s in range(self.seeds)]  # fmt: skip

    def settings(self) -> dict:
        """The grid as saved in OUT/grid.json (a grid without experts as folders made before them saved it)."""
        d = json.loads(json.dumps(asdict(self)))  # tuples as lists, as read back
        if not self.experts:
            del d["experts"]
        return d


def variant_name(experts: int) -> str:
    """The family name of the MoE variant with `experts` experts, e.g. 'moe-e16'."""
    return f"moe-e{experts}"


def experts_of(family: str) -> int | None:
    """The expert count a variant family names; None for 'dense' and 'moe'."""
    return int(family[len("moe-e") :]) if family.startswith("moe-e") else None


def with_experts(moe: MoEConfig, experts: int) -> MoEConfig:
    """`moe` with `experts` experts at the same active and total parameters: top-k and the expert width scaled by
    experts / moe.n_experts and its inverse. ConfigError naming --experts when they do not divide evenly."""
    k, width = moe.top_k * experts, moe.d_expert * moe.n_experts
    if k % moe.n_experts or width % experts or width // experts < 1:
        raise ConfigError(
            f"--experts {experts}: the recipe's {moe.n_experts} experts of width {moe.d_expert}, top-{moe.top_k}, "
            f"do not split evenly into {experts} (top-k x {experts} / {moe.n_experts} and width x "
            f"{moe.n_experts} / {experts} must be whole numbers)"
        )
    return MoEConfig(**{**moe.__dict__, "n_experts": experts, "top_k": k // moe.n_experts,
                        "d_expert": width // experts})  # fmt: skip


def granularity(moe: MoEConfig, d_ff: int) -> float:
    """Krajewski et al.'s granularity G: the dense FFN's width over an expert's."""
    return d_ff / moe.d_expert


def run_name(family: str, width: int, tokens: int, seed: int) -> str:
    """The run folder of one grid point, e.g. 'moe-d64-t200000-s0'."""
    return f"{family}-d{width}-t{tokens}-s{seed}"


def point_config(grid: Grid, family: str, width: int, tokens: int, seed: int) -> RunConfig:
    """The run config of one point: the recipe at `width`, trained on about `tokens` tokens."""
    cfg = load_config(grid.recipe(family), list(grid.overrides))
    if grid.data:
        cfg.data.source = grid.data
    if family != "dense" and cfg.model.moe is None:
        raise ConfigError(f"--moe {grid.moe}: the recipe has no MoE layers (model.moe is null)")
    if family == "dense" and cfg.model.moe is not None:
        raise ConfigError(f"--dense {grid.dense}: the recipe has MoE layers; give a dense recipe")
    cfg.model = scale_model(cfg.model, width, flag="--widths")
    experts = experts_of(family)
    if experts is not None and cfg.model.moe is not None:
        cfg.model = replace(cfg.model, moe=with_experts(cfg.model.moe, experts))
    if not any(o.startswith("optim.lr=") for o in grid.overrides):
        cfg.optim.lr = "auto"
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    cfg.train.steps = max(1, round(tokens / per_step))
    cfg.train.eval_every = cfg.train.steps
    cfg.train.ckpt_every = max(1, cfg.train.steps // 4)
    cfg.train.seed = seed
    cfg.name = run_name(family, width, tokens, seed)
    cfg.validate()
    return cfg


def scaling_grid(grid: Grid, out: Path, *, jobs: int = 1, quiet: bool = False) -> list[dict]:
    """Train every point of `grid` into OUT/runs (skipping finished ones, resuming interrupted
    ones; `jobs` trainings at once in processes of their own), one row each in OUT/runs.jsonl.
    Returns the rows."""
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a positive number of trainings at once, got {jobs}")
    if grid.experts and (len(set(grid.experts)) < 2 or len(set(grid.experts)) != len(grid.experts)):
        raise ConfigError(
            f"--experts: expected two or more distinct expert counts to compare, got {list(grid.experts)} (for one "
            "count, give --moe a recipe with it, e.g. --set model.moe.n_experts=16)"
        )
    if not grid.widths or not grid.tokens or grid.seeds < 1:
        raise ConfigError("scaling: --widths, --tokens and --seeds must each name at least one value")
    if any(w <= 0 for w in grid.widths) or any(t <= 0 for t in grid.tokens):
        raise ConfigError(
            f"--widths/--tokens: expected positive numbers, got {list(grid.widths)} / {list(grid.tokens)}"
        )
    out = guard_output(out, protect=[grid.dense, grid.moe, grid.data])
    settings = grid.settings()
    path = out / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if not grows(saved, settings):
            refuse_changed_settings(
                saved,
                settings,
                path,
                flag="scaling",
                noun="grid",
                may_change="the same flags, or more --widths, --tokens or --seeds: every finished run must stay a "
                "point of the grid the law is fitted on",
            )
    elif out.is_dir() and any(out.iterdir()):
        raise OutputExists(f"--out {out} already exists and is not a scaling folder: choose a new folder")
    configs = {p: point_config(grid, *p) for p in grid.points()}  # every point checked before any training
    with removed_on_failure(out, scaffolding=[SETTINGS_FILE]):
        write_json(path, settings)
        done = {r["name"] for r in read_rows(out)}
        todo = [p for p in grid.points() if configs[p].name not in done]
        bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="scaling", unit="run", disable=quiet)
        if jobs == 1:
            for p in todo:
                bar.set_postfix(run=configs[p].name)
                _record(out, p, configs[p], train_point(configs[p], out / "runs" / configs[p].name))
                bar.update()
        else:
            pinned = any(o.startswith("train.threads=") for o in grid.overrides)
            _train_apart(out, todo, configs, jobs, bar, pinned)
        bar.close()
    return read_rows(out)


def grows(saved: dict, settings: dict) -> bool:
    """Whether `settings` is the `saved` grid with more widths, token budgets or seeds and nothing else changed, so
    that every run it has finished is still one of its points."""
    same = all(saved.get(k) == settings.get(k) for k in saved.keys() | settings.keys() if k not in GROWS)
    return (
        same
        and set(saved["widths"]) <= set(settings["widths"])
        and set(saved["tokens"]) <= set(settings["tokens"])
        and saved.get("seeds", 1) <= settings["seeds"]
    )


def train_point(cfg: RunConfig, run_dir: Path) -> bool:
    """Train (or resume) one point in this process; False when it diverged (non-finite loss)."""
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    try:
        train(cfg, run_dir, resume=resume, overwrite=not resume, quiet=True)
    except NonFiniteError:  # a diverged point is a result (no loss), not a crash of the grid
        return False
    return True


def _train_apart(out: Path, todo: list, configs: dict, jobs: int, bar, pinned: bool) -> None:
    """Train the points `jobs` at a time, each in a process of its own with an equal share of
    the cores (unless train.threads is `pinned`); each ends if this command is killed."""
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    (out / "configs").mkdir(exist_ok=True)
    pending = list(todo)
    running: list[tuple[tuple, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < jobs:
            p = pending.pop(0)
            cfg = configs[p]
            if not pinned:
                cfg.train.threads = threads
            yaml_path = out / "configs" / f"{cfg.name}.yaml"
            save_config(cfg, yaml_path)
            cmd = [
                sys.executable,
                "-m",
                "moelab.analysis.studies.scaling.grid",
                str(yaml_path),
                str(out / "runs" / cfg.name),
            ]
            env = {**os.environ, PARENT_ENV: str(os.getpid())}
            running.append((p, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)))
        p, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode not in (0, DIVERGED):
            for _, other in running:
                other.kill()
            last = (err or "").strip().splitlines()[-1:] or ["no message"]
            raise ConfigError(f"scaling: training {configs[p].name} failed: {last[0]}")
        _record(out, p, configs[p], proc.returncode == 0)
        bar.update()


def _record(out: Path, point: tuple[str, int, int, int], cfg: RunConfig, finished: bool) -> None:
    family, width, tokens, seed = point
    counts = cfg.model.param_counts()
    row = {
        "name": cfg.name,
        "family": family,
        "width": width,
        "tokens_budget": tokens,
        "seed": seed,
        "n_layers": cfg.model.n_layers,
        "params": {k: counts[k] for k in ("non_embedding", "active_non_embedding", "total")},
        "flops_per_token": cfg.model.flops_per_token(cfg.data.seq_len),
        "lr": cfg.optim.lr,
        "loss": None,
    }
    if cfg.model.moe is not None:
        m = cfg.model.moe
        row.update(experts=m.n_experts, top_k=m.top_k, granularity=granularity(m, cfg.model.d_ff))
    if finished:
        run = read_run(out / "runs" / cfg.name)
        row.update(
            tokens=run.tokens[-1],
            flops=run.flops[-1],
            seconds=run.seconds[-1],
            loss=run.val_loss[-1],
            lr=run.cfg.optim.lr,
            machine=run.machine,
        )
    path = out / ROWS_FILE
    cut = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")  # a line cut by a kill stays on its own


def read_rows(out: Path) -> list[dict]:
    """The rows of OUT/runs.jsonl (one per finished run); [] when none yet. A row cut short by
    a kill (the last line) is ignored: its run is trained again."""
    path = Path(out) / ROWS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_grid(out: Path) -> Grid:
    """The grid a scaling folder was started with; ConfigError when OUT is not one."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{out}: not a scaling folder ({SETTINGS_FILE} is missing): run `moelab scaling` first")
    d = json.loads(path.read_text())
    return Grid(**{**d, **{k: tuple(d.get(k, ())) for k in ("widths", "tokens", "overrides", "experts")}})


if (
    __name__ == "__main__"
):  # one point trained apart (--jobs): python -m moelab.analysis.studies.scaling.grid CONFIG RUN
    from ....errors import MoelabError
    from ....run_config import read_config
    from ....runtime import exit_with_parent

    exit_with_parent()
    try:
        sys.exit(0 if train_point(read_config(Path(sys.argv[1])), Path(sys.argv[2])) else DIVERGED)
    except MoelabError as e:
        print(f"moelab scaling: error: {e}", file=sys.stderr)
        sys.exit(2)
