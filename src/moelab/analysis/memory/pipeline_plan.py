"""Memory per pipeline rank, and the schedule's bubble (`moelab memory --pipeline P`).

Weights, gradients and optimizer state of a rank are exact: its stages' parameters, counted
on the `meta` device by the same split `parallel.pipeline` trains with. Activations are
one micro-batch's (the per-token terms of `analysis.memory.plan`, for the rank's layers, the
head's on the last stage) times the micro-batches in flight at the rank's peak:
  GPipe, looped BFS  all M forwards (of each of its stages) before the first backward;
  1F1B               rank r: min(P - r, M) - the first rank holds the most;
  interleaved 1F1B   rank r: min(V M, 2 (P - r - 1) + (V - 1) P + 1) chunks of 1/V of its
  and zero bubble    layers (Megatron's warm-up count; approximate; for zero bubble a lower
                     bound: a deferred weight gradient keeps its inputs until it runs).
Bubble: the share of a step a rank idles, (P - 1) / (M + P - 1) for GPipe and 1F1B,
(P - 1) / (V M + P - 1) for the multi-stage schedules (for zero bubble an upper bound:
it fills part of it with weight-gradient work). `analysis.memory.pipeline_measure` measures both
in real processes.
"""

from __future__ import annotations

import torch

from ...config import ModelConfig
from ...model import Transformer
from ...parallel.pipeline import split_layers
from ...run_config import OptimConfig
from ...train.optim import state_bytes
from .plan import activation_elements_per_token
from .setup import PipelineShape


def plan_stages(cfg: ModelConfig, shape: PipelineShape, *, optim: OptimConfig | None = None) -> list[dict]:
    """Per pipeline rank of `shape` (fp32, `optim`: AdamW when None): its layers and bytes of params, grads, optimizer,
    activations and their total."""
    with torch.device("meta"):
        model = Transformer(cfg)
    pipeline, S = shape.pipeline, shape.pipeline * shape.virtual
    parts = split_layers(cfg.n_layers, S, list(shape.points) if shape.points is not None else None)
    act = activation_elements_per_token(cfg)
    per_layer = {
        i: act["attention"] / cfg.n_layers
        + (
            act["moe_ffn"] / max(cfg.n_moe_layers, 1)
            if layer.is_moe
            else act["dense_ffn"] / (cfg.n_layers - cfg.n_moe_layers)
        )
        for i, layer in enumerate(model.layers)
    }
    T = shape.micro_batch * shape.seq_len
    out = []
    for r in range(pipeline):
        stages = [s for s in range(S) if s % pipeline == r]
        layers = [i for s in stages for i in parts[s]]
        names = {f"layers.{i}." for i in layers}
        first, last = 0 in stages, S - 1 in stages
        params = [
            (n, p)
            for n, p in model.named_parameters()
            if any(n.startswith(k) for k in names)
            or (first and n.startswith("embed."))
            or (last and n.startswith(("norm.", "lm_head.")))
        ]
        n = sum(p.numel() for _, p in params)
        per_micro = 4 * T * sum(per_layer[i] for i in layers)
        if last:  # the head's terms and the fp32 logits the loss reads
            per_micro += 4 * T * act["head"] + 4 * T * cfg.vocab_size
        b = {
            "params": 4 * n,
            "grads": 4 * n,
            "optimizer": sum(_state(name, p, optim) for name, p in params),
            "activations": round(per_micro * shape.in_flight(r)),
        }
        b["total"] = sum(b.values())
        out.append({"rank": r, "stages": stages, "layers": layers, "bytes": b,
                    "micro_batches_in_flight": shape.in_flight(r)})  # fmt: skip
    return out


def _state(name: str, p: torch.Tensor, optim: OptimConfig | None) -> int:
    per_element, per_tensor = state_bytes(name, p, optim)
    return per_element * p.numel() + per_tensor


def _ranges(layers: list[int]) -> str:
    """[0, 1, 4, 5] -> "0-1,4-5" (an interleaved rank holds runs of layers apart)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "-"


def format_stages(stages: list[dict], bubble: float, measured: list[dict] | None = None) -> str:
    """The per-rank table and the bubble, as `moelab memory --pipeline` prints them; with
    `measured` (`analysis.memory.pipeline_measure`), a measured row under each rank's plan."""
    mib = 2**20
    lines = ["rank  layers        params MiB  grads MiB  optim MiB  activations MiB (in flight)  total MiB"]
    for s in stages:
        b = s["bytes"]
        layers = _ranges(s["layers"])
        lines.append(
            f"{s['rank']:>4}  {layers:<12} {b['params'] / mib:>10.1f} {b['grads'] / mib:>10.1f} "
            f"{b['optimizer'] / mib:>10.1f} {b['activations'] / mib:>16.1f} ({s['micro_batches_in_flight']:g})"
            f" {b['total'] / mib:>11.1f}"
        )
        if measured:
            m = measured[s["rank"]]
            total = sum(m[k] for k in ("params", "grads", "optimizer", "activations"))
            lines.append(
                f"{'':>4}  {'measured':<12} {m['params'] / mib:>10.1f} {m['grads'] / mib:>10.1f} "
                f"{m['optimizer'] / mib:>10.1f} {m['activations'] / mib:>16.1f} {'':>4} {total / mib:>11.1f}"
                f"   bubble {100 * m['bubble']:.1f}%"
            )
    lines.append(f"bubble: {100 * bubble:.1f}% of each step idle on every rank (predicted)")
    if measured:
        lines.append(
            "measured bubble: the share of a step each rank did not spend in its stages' forward and backward "
            "(waits and sends; a tiny model's is mostly communication)"
        )
    return "\n".join(lines)
