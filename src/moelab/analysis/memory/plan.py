"""Memory planning: bytes per device for a dense or MoE model under data/expert
parallelism and ZeRO, predicted from the config and (on one device) measured.

Legend: T = micro_batch * seq_len tokens per device, D model dim, F hidden, E experts,
k top-k, V vocab, a activation bytes per element.

Parameters are enumerated from a model built on the `meta` device, so counts are exact
for any config without allocating it (46.7 B for Mixtral-8x7B costs nothing).

Precision (`dtype`): "fp32" = fp32 weights, grads, optimizer state (what `moelab train`
does on CPU); "bf16" = bf16 weights and grads with fp32 master weights and state (the
usual mixed-precision layout), bf16 activations. Optimizer state: AdamW's two moments and
a step scalar per tensor, or with `optim.name=muon` one momentum for the matrices and
expert stacks Muon takes (AdamW's for the rest).

Activations are what autograd keeps for backward at the end of a forward pass, plus the
fp32 logits the model returns. The per-layer terms below follow moelab's own ops:
  attention  2D (RMSNorm in/out) + 2(D + D_kv) (RoPE inputs and rotated halves)
             + 2D + 2D_kv (SDPA q, k, v, out) + H (log-sum-exp) + D (o-proj input)
  dense FFN  2D (norm) + 4F (gate, silu(gate), up, silu*up)
  MoE FFN    2D (norm) + 2E (router logits, probs) + kD (rows gathered per expert)
             + 4kF (as dense, per assignment) + k*min(D, F) (routing-weighted side);
             under expert parallelism k(3D + 4F) where the experts are (the received
             row, its regrouped copy, the output going back) + 2kD at home (the returned
             rows and their weighting), with uniform routing (skewed: `analysis.skew`)
  head       2D (final norm) + V (log-softmax) + V fp32 logits returned
With activation checkpointing only each layer's input (D) is kept, plus one layer's
activations recomputed at a time in backward. Capacity padding: moelab drops or keeps
rows without padded E x C buffers, so there is none; padded implementations hold
capacity_factor * k * T rows instead of k * T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ...config import ModelConfig
from ...model import Transformer
from ...run_config import OptimConfig
from ...train.optim import build_optimizer, state_bytes
from .setup import MemorySetup

GiB = 1024**3


def _param_inventory(cfg: ModelConfig, optim: OptimConfig | None = None) -> list[tuple]:
    """Each parameter tensor's (kind: "expert" or "other", shape, optimizer bytes per element, per tensor), exact for
    any config: the model is built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return [
        ("expert" if ".experts." in name else "other", tuple(p.shape), *state_bytes(name, p, optim))
        for name, p in model.named_parameters()
    ]


def _rank0_numel(shape: tuple[int, ...], ways: int) -> int:
    """Elements of the first (largest) of `ways` dim-0 chunks, as FSDP2 and DTensor cut them."""
    rest = math.prod(shape[1:])
    return -(-shape[0] // ways) * rest if shape else 1


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same active FFN width: `ModelConfig.dense_twin`."""
    return cfg.dense_twin()


def activation_elements_per_token(cfg: ModelConfig, expert_parallel: int = 1) -> dict[str, float]:
    """Elements kept for backward per token, by part (see the module docstring)."""
    D, H, V = cfg.d_model, cfg.n_heads, cfg.vocab_size
    Dkv = cfg.kv_heads * cfg.head_dim
    attn = 2 * D + 2 * (D + Dkv) + 2 * D + 2 * Dkv + H + D
    dense = 2 * D + 4 * cfg.d_ff
    moe = 0.0
    if cfg.moe is not None:
        m = cfg.moe
        if expert_parallel == 1:
            rows = m.top_k * D + 4 * m.top_k * m.d_expert + m.top_k * min(D, m.d_expert)
        else:  # rows kept where their expert is (EXPERT_ROW_EP) and, on return, weighted at home (2D)
            rows = m.top_k * expert_row_elements(cfg, expert_parallel) + 2 * m.top_k * D
        moe = 2 * D + 2 * m.n_experts + rows + (4 * m.d_shared_total if m.n_shared_experts else 0)
    n_moe = cfg.n_moe_layers
    return {
        "attention": cfg.n_layers * attn,
        "dense_ffn": (cfg.n_layers - n_moe) * dense,
        "moe_ffn": n_moe * moe,
        "head": 2 * D + V,
        "per_layer_max": attn + max(dense, moe),
    }


def expert_row_elements(cfg: ModelConfig, expert_parallel: int = 1) -> int:
    """Elements one routed row keeps on the rank that holds its expert: one process keeps
    its gathered input (D), gate, silu, up and product (4F) and the routing-weighted side
    (min(D, F)); under expert parallelism the received row, its regrouped copy and the
    expert output on their way back (3D) and the 4F, the weighting happening at home."""
    assert cfg.moe is not None
    D, F = cfg.d_model, cfg.moe.d_expert
    return D + 4 * F + min(D, F) if expert_parallel == 1 else 3 * D + 4 * F


@dataclass
class MemoryPlan:
    """Predicted bytes per device for one model: params, grads, optimizer, activations, comm and total, with parameter
    counts and one-line notes on what the experts cost."""

    name: str
    params_total: int
    params_active: int
    bytes: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The plan as a JSON-ready dict (what `moelab memory --json` prints)."""
        return {
            "name": self.name,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "bytes": self.bytes,
            "notes": self.notes,
        }


def plan_memory(
    cfg: ModelConfig, setup: MemorySetup | None = None, *, name: str = "model", optim: OptimConfig | None = None
) -> MemoryPlan:
    """Predict memory per device for `cfg` training as `setup` says (micro-batch, devices, expert parallelism, ZeRO
    stage, precision, activation checkpointing) under `optim` (AdamW when None; Muon keeps one moment for the
    matrices it takes; `setup` None: one device, one sequence). Raises ValueError for a layout that does not fit."""
    setup = setup or MemorySetup()
    devices, expert_parallel = setup.devices, setup.expert_parallel
    zero, dtype = setup.zero, setup.dtype
    T = setup.tokens(cfg)
    if devices % expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} must divide --devices {devices}")
    if cfg.moe is not None and cfg.moe.n_experts % expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} must divide n_experts={cfg.moe.n_experts}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype}")
    inv = _param_inventory(cfg, optim)
    pb, gb = (4, 4) if dtype == "fp32" else (2, 2)
    master = 0 if dtype == "fp32" else 4  # bf16 training keeps an fp32 master copy beside the optimizer state
    ab = 4 if dtype == "fp32" else 2
    ep, dp_expert = expert_parallel, devices // expert_parallel

    def shard(stage: int, per_elem=lambda t: 1) -> float:
        """Elements a device holds (weighted by `per_elem` of each tensor): experts are split over the EP group and
        replicated over the rest, so from ZeRO `stage` on they are sharded over devices / EP, the rest over all
        devices - rank 0's share, each tensor cut in dim-0 chunks with the first one the largest."""
        n = 0
        for t in inv:
            kind, shape = t[0], t[1]
            if kind == "expert":
                shape = (shape[0] // ep, *shape[1:])
            ways = (dp_expert if kind == "expert" else devices) if zero >= stage else 1
            n += per_elem(t) * _rank0_numel(shape, ways)
        return n

    b = {
        "params": round(pb * shard(3)),
        "grads": round(gb * shard(2)),
        # per-tensor state (AdamW's fp32 `step`) is not sharded: every rank keeps its own
        "optimizer": round(shard(1, lambda t: t[2] + master) + sum(t[3] for t in inv)),
    }
    act = activation_elements_per_token(cfg, expert_parallel)
    logits = 4 * T * cfg.vocab_size
    if setup.activation_checkpointing:
        per_token = cfg.n_layers * cfg.d_model + act["per_layer_max"] + act["head"]
    else:
        per_token = act["attention"] + act["dense_ffn"] + act["moe_ffn"] + act["head"]
    b["activations"] = round(ab * T * per_token + logits)
    b["comm"] = 0
    if cfg.moe is not None and ep > 1:
        # all-to-all send and receive buffers for one MoE layer in flight
        b["comm"] = round(2 * ab * cfg.moe.top_k * T * cfg.d_model)
    b["total"] = sum(b.values())
    pc = cfg.param_counts()
    plan = MemoryPlan(name, pc["total"], pc["active"], b)
    if cfg.moe is not None:
        ob = max(t[2] for t in inv if t[0] == "expert") + master
        plan.notes = moe_notes(cfg, T, ab, pb, gb, ob, ep)
    return plan


def moe_notes(cfg: ModelConfig, T: int, ab: int, pb: int, gb: int, ob: int, ep: int) -> list[str]:
    """One-line explanations of why an MoE needs more memory than its dense twin (experts, optimizer state, dispatch
    buffers, router, capacity padding, expert parallelism), with byte figures."""
    m, pc = cfg.moe, cfg.param_counts()
    if m is None:
        return []
    extra = pc["total"] - pc["active"]
    L = cfg.n_moe_layers
    gathered = ab * T * m.top_k * cfg.d_model * L
    router = 2 * ab * T * m.n_experts * L
    notes = [
        f"experts: all {m.n_experts} sit in memory though each token uses {m.top_k}; "
        f"{pc['total'] / pc['active']:.2f}x the parameters of the dense twin "
        f"(+{extra / 1e6:,.1f} M idle per token)",
        f"gradients and optimizer state scale with total parameters: +{(gb + ob) * extra / GiB:,.2f} GiB "
        f"over the dense twin (before ZeRO sharding)",
        f"dispatch: each token is copied to {m.top_k} experts: {m.top_k}*T*D gathered rows per layer, "
        f"{gathered / GiB:,.3f} GiB over {L} MoE layers",
        f"router: logits and probabilities, 2*T*E per layer: {router / GiB:,.4f} GiB",
        "capacity padding: none (moelab drops or keeps rows; padded E x C buffers would add "
        "(capacity_factor - 1) x the dispatch rows)",
    ]
    if ep > 1:
        notes.append(
            f"expert parallelism: all-to-all send+receive buffers of {m.top_k}*T*D per MoE layer in flight; "
            f"experts split {ep} ways ({m.n_experts // ep} per device)"
        )
    return notes


# ------------------------------------------------------------------ measurement
def measure_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[int, Any]:
    """Bytes of distinct storages autograd saves during one forward, plus the returned
    logits; weights are not activations: a saved parameter or view of one is skipped
    (under FSDP2 the weights saved are all-gathered copies, whose freed storage the
    allocator may hand to a later activation, so addresses alone cannot tell them
    apart). Returns (bytes, model output)."""
    # an FSDP2 parameter is a DTensor: its own storage is the local shard
    params = {getattr(p, "to_local", lambda p=p: p)().untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1], tokens[:, 1:])
    return sum(seen.values()) + out.logits.numel() * out.logits.element_size(), out


def measure_memory(
    cfg: ModelConfig,
    setup: MemorySetup,
    *,
    steps: int = 2,
    isolated: bool = True,
    optim: OptimConfig | None = None,
) -> dict[str, int]:
    """Run real fp32 steps of `optim` (AdamW when None) of `setup`'s micro-batch on this machine (one device) and read
    each category off the tensors. `isolated` runs them in a fresh process so its peak RSS belongs to this model
    alone."""
    if isolated:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_measure_here, (cfg, setup, steps, optim))
    return _measure_here(cfg, setup, steps, optim)


def _measure_here(cfg: ModelConfig, setup: MemorySetup, steps: int, optim: OptimConfig | None) -> dict[str, int]:
    import resource

    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, optim or OptimConfig())
    tokens = torch.randint(0, cfg.vocab_size, (setup.micro_batch, (setup.seq_len or cfg.max_seq_len) + 1))
    act = 0
    for _ in range(steps):
        act, out = measure_activation_bytes(model, tokens)
        out.loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt_bytes = sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return {
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": grads,
        "optimizer": opt_bytes,
        "activations": act,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plans(plans: list[MemoryPlan], measured: dict[str, dict] | None = None) -> str:
    """A side-by-side table (one column per plan, measured columns beside predicted)."""
    measured = measured or {}
    header = ["per device"]
    for p in plans:
        header.append(p.name)
        if p.name in measured:
            header.append(f"{p.name} measured")
    rows = [header]
    rows.append(
        ["params total"] + sum(([f"{p.params_total:,}"] + ([""] if p.name in measured else []) for p in plans), [])
    )
    rows.append(
        ["params active/token"]
        + sum(([f"{p.params_active:,}"] + ([""] if p.name in measured else []) for p in plans), [])
    )
    for key in ("params", "grads", "optimizer", "activations", "comm", "total", "peak_rss"):
        row = [key if key != "peak_rss" else "process peak RSS"]
        for p in plans:
            row.append(_fmt_bytes(p.bytes[key]) if key in p.bytes else "")
            if p.name in measured:
                row.append(_fmt_bytes(measured[p.name][key]) if key in measured[p.name] else "")
        if any(row[1:]):
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for p in plans:
        if p.notes:
            lines.append(f"\nWhy {p.name} needs more memory than its dense twin:")
            lines += [f"  - {n}" for n in p.notes]
    return "\n".join(lines)
