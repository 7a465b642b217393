"""Inference measured: a model beside its dense twin (equal active parameters) and its dense total
twin (equal total parameters), for the explainer's claim that an MoE decodes faster than a dense
model of its size but needs the memory of all its parameters.

Per model: prefill tokens/s (one prompt filling the context), decode tokens/s at each batch size
(from a one-token prompt to the full context, every new token through the KV cache), and resident
bytes (weights plus the KV cache at the largest batch and full context). The models are timed in
turn within each round, so a busy host slows all of them alike; each figure is the median over
rounds. The twins have random weights (decode speed does not depend on their values); the model
itself keeps its trained routing when given a run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..model import Transformer
from ..model.cache import KVCache
from .decode import decode, decode_uncached


@dataclass
class InferenceRow:
    """One model's figures; `decode_tokens_per_s` maps batch size -> tokens/s (all sequences together)."""

    name: str
    params_total: int
    params_active: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float]
    weights_bytes: int
    kv_cache_bytes: int
    uncached_tokens_per_s: float | None = None  # batch 1 without the cache (the reference decoder)

    @property
    def resident_bytes(self) -> int:
        """Weights plus the KV cache at the largest batch, full context."""
        return self.weights_bytes + self.kv_cache_bytes


@dataclass
class InferenceReport:
    """Rows in order (the model, its dense twin, its dense total twin), how they were measured, and the
    machine."""

    rows: list[InferenceRow]
    context: int
    batches: list[int]
    rounds: int
    machine: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """Plain data for --json and report files."""
        rows = [
            asdict(r)
            | {
                "resident_bytes": r.resident_bytes,
                "decode_tokens_per_s": {str(b): v for b, v in r.decode_tokens_per_s.items()},
            }
            for r in self.rows
        ]  # batch sizes as JSON keys: strings, in memory as after a round trip
        return {"rows": rows, "context": self.context, "batches": self.batches, "rounds": self.rounds,
                "machine": self.machine, "notes": self.notes}  # fmt: skip


def _str_keys(d: dict[int, float]) -> dict[str, float]:
    return {str(k): v for k, v in d.items()}


def twins(cfg: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """(label, config) of a model's comparison set: itself, then for an MoE its dense twin and dense total twin."""
    if cfg.moe is None or not cfg.n_moe_layers:
        return [("model", cfg)]
    return [("model", cfg), ("dense twin", cfg.dense_twin()), ("dense total twin", cfg.dense_total_twin())]


def _weights_bytes(model: Transformer) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def _prefill_s(model: Transformer, prompt_1S: torch.Tensor) -> float:
    cache = KVCache(model.cfg.n_layers, 1, prompt_1S.shape[1])
    t = time.perf_counter()
    model(prompt_1S, cache=cache)
    return time.perf_counter() - t


def _decode_s(model: Transformer, batch: int, new: int, start: int) -> float:
    t = time.perf_counter()
    done = decode(model, [[start]] * batch, new)
    elapsed = time.perf_counter() - t
    assert all(len(d.tokens) == new for d in done)  # no eos given: every sequence runs to the end
    return elapsed


def bench_inference(
    models: Sequence[tuple[str, Transformer]],
    batches: Sequence[int] = (1, 8),
    rounds: int = 3,
    uncached: bool = False,
    machine: str = "",
) -> InferenceReport:
    """Measure each (name, model) as the module docstring says; `uncached` adds the first model's batch-1
    decode without the cache (slow: the whole prefix again per token)."""
    device = models[0][1].output_weight.device
    context = min(m.cfg.max_seq_len for _, m in models)
    new = context - 1  # from a one-token prompt to the full context
    prompt = torch.randint(0, min(m.cfg.vocab_size for _, m in models), (1, context), device=device)
    # seconds per round: prefill, decode at each batch size, and the uncached reference
    times: dict[str, dict[str | int, list[float]]] = {n: {"prefill": [], "uncached": []} for n, _ in models}
    for n in times:
        times[n].update({b: [] for b in batches})
    for m in (m for _, m in models):  # warm-up: allocator, kernels, lazy inits
        m.eval()
        _prefill_s(m, prompt)
        decode(m, [[1]], 4)
    for _ in range(rounds):
        for name, m in models:
            times[name]["prefill"].append(_prefill_s(m, prompt))
            for b in batches:
                times[name][b].append(_decode_s(m, b, new, int(prompt[0, 0])))
        if uncached:
            name, m = models[0]
            t0 = time.perf_counter()
            decode_uncached(m, [int(prompt[0, 0])], new)
            times[name]["uncached"].append(time.perf_counter() - t0)
    rows = []
    for name, m in models:
        sec = times[name]
        # keys and values, every layer, the largest batch, the full context: what KVCache allocates
        kv_bytes = 2 * m.cfg.n_layers * max(batches) * m.cfg.kv_heads * context * m.cfg.head_dim
        kv_bytes *= m.output_weight.element_size()
        counts = m.cfg.param_counts()
        rows.append(
            InferenceRow(
                name=name,
                params_total=counts["total"],
                params_active=counts["active"],
                prefill_tokens_per_s=context / statistics.median(sec["prefill"]),
                decode_tokens_per_s={b: b * new / statistics.median(sec[b]) for b in batches},
                weights_bytes=_weights_bytes(m),
                kv_cache_bytes=kv_bytes,
                uncached_tokens_per_s=new / statistics.median(sec["uncached"]) if sec["uncached"] else None,
            )
        )
    return InferenceReport(rows, context, list(batches), rounds, machine)


def format_report(rep: InferenceReport) -> str:
    """The table a terminal shows, with the MoE-vs-twins sentence under it."""
    bs = rep.batches
    head = ["model", "params (active)", "prefill tok/s", *[f"decode b={b} tok/s" for b in bs], "resident MiB"]
    lines = [" | ".join(head)]
    for r in rep.rows:
        params = f"{r.params_total / 1e6:.2f}M ({r.params_active / 1e6:.2f}M)"
        cells = [r.name, params, f"{r.prefill_tokens_per_s:,.0f}", *[f"{r.decode_tokens_per_s[b]:,.0f}" for b in bs],
                 f"{r.resident_bytes / 2**20:.1f}"]  # fmt: skip
        lines.append(" | ".join(cells))
    lines.append(
        f"context {rep.context} tokens (a 1-token prompt decoded to the full context), median of {rep.rounds} "
        f"rounds, {rep.machine}; resident = weights + KV cache at batch {max(bs)}"
    )
    lines += verdict(rep)
    return "\n".join(lines)


def verdict(rep: InferenceReport) -> list[str]:
    """The explainer's claim checked in words: MoE decode against each twin at batch 1, and memory."""
    by = {r.name: r for r in rep.rows}
    out = []
    if "dense twin" in by:
        m, b1 = by["model"], min(rep.batches)
        for twin, claim in (("dense twin", "equal active parameters"), ("dense total twin", "equal total parameters")):
            t = by[twin]
            x = m.decode_tokens_per_s[b1] / t.decode_tokens_per_s[b1]
            out.append(
                f"batch-{b1} decode: the MoE at {x:.2f}x its {twin}'s tokens/s ({claim}); "
                f"resident memory {m.resident_bytes / t.resident_bytes:.2f}x"
            )
    slow = by["model"].uncached_tokens_per_s
    if slow:
        m = by["model"]
        out.append(
            f"the KV cache: {m.decode_tokens_per_s[min(rep.batches)] / slow:.1f}x the "
            f"tokens/s of decoding without it (batch {min(rep.batches)}, the whole prefix again per token)"
        )
    return out


def bench_source(
    src: str,
    overrides: Sequence[str] = (),
    batches: Sequence[int] = (1, 8),
    rounds: int = 3,
    uncached: bool = False,
    device: str = "auto",
) -> InferenceReport:
    """`bench_inference` of a run or checkpoint (its trained weights, LoRA merged, quantized weights as
    they compute) or a recipe/YAML (random weights), beside its twins."""
    from ..run_config import load_config
    from ..runtime import machine_name, pick_device
    from ..store.run import load_run

    dev = pick_device(device)
    if Path(src).is_dir():
        if overrides:
            raise ConfigError(f"{src}: {overrides[0]}: a run is measured as it is; overrides are for recipes")
        run = load_run(src, device=str(dev))
        cfg, trained = run.cfg.model, run.model
    else:
        cfg, trained = load_config(src, list(overrides)).model, None
    models: list[tuple[str, Transformer]] = []
    for label, c in twins(cfg):
        m = trained if label == "model" and trained is not None else Transformer(c).to(dev)
        models.append((label, m.eval()))
    return bench_inference(models, batches, rounds, uncached, machine_name(dev))


def bench_runs(runs: Sequence[tuple[str, Path]], rounds: int = 3, batches: Sequence[int] = (1, 8)) -> dict:
    """The compare report's Inference part: each (name, run folder) as trained, and the first MoE's dense total
    twin, measured together; plain data with one sentence per MoE run."""
    from ..runtime import machine_name
    from ..store.run import load_run

    models: list[tuple[str, Transformer]] = [(name, load_run(d, device="cpu").model) for name, d in runs]
    moe = next(((n, m) for n, m in models if m.cfg.n_moe_layers), None)
    if moe is not None:
        models.append((f"{moe[0]} dense total twin", Transformer(moe[1].cfg.dense_total_twin()).eval()))
    rep = bench_inference(models, batches, rounds, machine=machine_name(torch.device("cpu")))
    b1 = min(batches)
    by = {r.name: r for r in rep.rows}
    dense = [r for (n, m), r in zip(models, rep.rows, strict=True) if not m.cfg.n_moe_layers and "twin" not in n]
    text = []
    for (n, m), r in zip(models, rep.rows, strict=True):
        if not m.cfg.n_moe_layers:
            continue
        parts = [f"{n} decodes {r.decode_tokens_per_s[b1]:,.0f} tokens/s at batch {b1}"]
        own_twin = [by[f"{n} dense total twin"]] if f"{n} dense total twin" in by else []  # the first MoE's only
        for other in dense[:1] + own_twin:
            parts.append(
                f"{r.decode_tokens_per_s[b1] / other.decode_tokens_per_s[b1]:.2f}x {other.name}'s "
                f"with {r.resident_bytes / other.resident_bytes:.2f}x its resident memory"
            )
        text.append(", ".join(parts) + f" (KV-cached, context {rep.context}, {rep.machine}).")
    return rep.to_json() | {"text": text}
