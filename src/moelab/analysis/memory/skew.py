"""Skew-aware activation memory: dropless routing makes an expert-parallel rank hold the
rows of its experts, so with a trained router's uneven loads the busiest rank keeps more
activations than the uniform plan of `analysis.memory` says. `moelab memory RUN` reads a
run's measured loads (its last metrics record) and predicts the worst rank.

Per MoE layer l and expert-parallel rank r (experts split in contiguous slices),
share[l][r] is the fraction of the layer's assignments that go to r's experts; with
uniform routing it is 1/EP. What each assignment keeps for backward is the single-process
per-row term of the plan (`memory.expert_row_elements`: under expert parallelism the
received row, its regrouped copy and the output on its way back, 3D, and the experts'
gate, silu, up and product, 4F). So rank r keeps

    uniform activations + a * T * k * per_row * sum_l (EP * share[l][r] - 1)

bytes, T the rank's tokens, a the activation bytes per element; the worst rank is the
largest. The rest of the step (attention, dense layers, router, head) does not depend
on routing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ...config import ConfigError, ModelConfig
from ...data import Sampler
from ...run_config import RunConfig
from ...store.run import load_run
from ...train.evaluate import unpack_batch
from ...train.setup import run_data
from .measure import measure_parallel
from .plan import expert_row_elements
from .setup import MemorySetup


def run_loads(run_dir: Path) -> list[list[float]]:
    """Each MoE layer's expert loads (fractions of its assignments) from the run's last
    metrics record that has them; ConfigError when the run logged none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl, so no measured expert loads to plan with")
    for line in reversed(path.read_text().splitlines()):
        layers = json.loads(line).get("moe_layers") if line.strip() else None
        if layers:
            return [[float(x) for x in m["load"]] for m in layers]
    raise ConfigError(f"{path}: no record holds expert loads (moe_layers); is this an MoE run?")


def rank_shares(loads: list[list[float]], expert_parallel: int) -> list[list[float]]:
    """share[l][r]: the fraction of layer l's assignments that rank r's experts take."""
    out = []
    for lo in loads:
        per = len(lo) // expert_parallel
        total = sum(lo) or 1.0
        out.append([sum(lo[r * per : (r + 1) * per]) / total for r in range(expert_parallel)])
    return out


def skewed_activation_bytes(
    cfg: ModelConfig, loads: list[list[float]], tokens: int, expert_parallel: int, act_bytes: int = 4
) -> dict:
    """Extra activation bytes per expert-parallel rank over the uniform plan, for `tokens`
    tokens per rank: {"extra": [bytes per rank], "worst_rank", "shares"}."""
    m = cfg.moe
    if m is None:
        raise ConfigError("skew-aware memory: the model has no MoE layers")
    if len(loads) != cfg.n_moe_layers or any(len(lo) != m.n_experts for lo in loads):
        raise ConfigError(
            f"expert loads: expected {cfg.n_moe_layers} MoE layers of {m.n_experts} experts, "
            f"got {[len(lo) for lo in loads]}"
        )
    per_row = expert_row_elements(cfg, expert_parallel)
    shares = rank_shares(loads, expert_parallel)
    extra = [
        act_bytes * tokens * m.top_k * per_row * sum(expert_parallel * s[r] - 1 for s in shares)
        for r in range(expert_parallel)
    ]
    worst = max(range(expert_parallel), key=lambda r: extra[r])
    return {"extra": extra, "worst_rank": worst, "shares": shares}


def measure_skewed(run_dir: Path, cfg: RunConfig, setup: MemorySetup) -> list[dict]:
    """Every rank's measured bytes in a real `setup.devices`-process step of the run's own
    weights on its own training text (each rank its own batch), the weights unchanged."""
    run = load_run(run_dir, device="cpu")
    data = run_data(cfg, run.tokenizer_file)
    sampler = Sampler(len(data.train), setup.micro_batch * setup.devices, cfg.train.seed)
    x, y, _ = unpack_batch(data.train.batch(sampler.next()))
    S = min(setup.seq_len or cfg.model.max_seq_len, x.shape[1])
    tokens = torch.cat([x[:, :S], y[:, S - 1 : S]], dim=1)  # S inputs and the next token
    return measure_parallel(
        cfg.model,
        replace(setup, seq_len=S),
        steps=1,
        state=run.model.state_dict(),
        tokens_RBS=tokens.view(setup.devices, -1, S + 1),
        optim=cfg.optim,
    )


def skew_report(run_dir: Path, cfg: RunConfig, uniform_bytes: int, setup: MemorySetup, *, measure: bool) -> dict:
    """The busiest rank's activations predicted from the run's measured loads next to the
    uniform plan (`uniform_bytes`), measured in `setup.devices` real processes on request; a
    `text` line says it."""
    loads = run_loads(run_dir)
    ab = 4 if setup.dtype == "fp32" else 2
    expert_parallel = setup.expert_parallel
    skew = skewed_activation_bytes(cfg.model, loads, setup.tokens(cfg.model), expert_parallel, ab)
    worst = uniform_bytes + skew["extra"][skew["worst_rank"]]
    busiest = [max(s) * expert_parallel for s in skew["shares"]]
    res = {
        "uniform": uniform_bytes,
        "worst_rank": skew["worst_rank"],
        "predicted": worst,
        "rank_max_over_mean": busiest,
    }
    res["text"] = (
        f"with this run's measured expert loads the busiest expert-parallel rank ({skew['worst_rank']}) keeps "
        f"{worst / 2**20:,.2f} MiB of activations vs {uniform_bytes / 2**20:,.2f} MiB with uniform routing "
        f"({100 * (worst / uniform_bytes - 1):+.0f}%; its rows per MoE layer: "
        f"{', '.join(f'{b:.2f}x' for b in busiest)} the mean)"
    )
    if expert_parallel == 1:
        res["text"] = "one expert-parallel rank holds every expert: uneven loads do not change its activations"
    if measure:
        if setup.dtype != "fp32":
            raise ConfigError("--measure runs on this machine's CPU: use --dtype fp32")
        ranks = measure_skewed(run_dir, cfg, setup)
        res["measured"] = [r["activations"] for r in ranks]
        top = max(range(len(ranks)), key=lambda r: res["measured"][r])
        res["text"] += (
            f"; measured ({setup.devices} processes, the run's weights on its own text): rank {top} "
            f"{res['measured'][top] / 2**20:,.2f} MiB, ranks {', '.join(f'{b / 2**20:,.2f}' for b in res['measured'])}"
        )
    return res
