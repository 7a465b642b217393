"""`moelab experts`: what each expert takes (share, characteristic tokens, token classes,
domains), how sure and how correlated the routers are, how routing moved over training
and, given a base model, how a fine-tune moved it.

Text is streamed domain by domain (one domain per source, or per `domain` field of a
.jsonl line), packed into sequences that never mix domains, routed in batches, and only
counts are kept (see `routes`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from ...data import dataset_for, is_dataset
from ...data.sources import check_source, is_validation, iter_documents
from ...data.tokenizer import eos_id
from ...errors import CheckpointError, ConfigError
from ...store.checkpoint import complete_checkpoints, model_tensors
from ...store.run import LoadedRun, load_run
from .routes import CLASSES, LayerCounts, LayerDiff, TokenTable, capture_routing, domain_dependence, expert_similarity

BATCH = 8
MAX_SIMILARITY_CHECKPOINTS = 8


@dataclass
class Batch:
    """Sequences (B, S) of one domain."""

    domain: int
    tokens_BS: torch.Tensor


def source_label(src: str, taken: set[str]) -> str:
    """A short, unique name for a source: its file or folder name."""
    base = "stdlib" if src == "stdlib" else (Path(src).name or src)
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    return label


def domain_batches(
    sources: Sequence[str], run: LoadedRun, split: str, max_tokens: int, seq_len: int, domains: list[str]
) -> Iterator[Batch]:
    """Batches of each domain's text, at most `max_tokens` per domain; `domains` fills with
    the domain names in order of first appearance. ConfigError when a domain has no text
    in `split`."""
    tok = run.need_tokenizer()
    eos, vf, field = eos_id(tok), run.cfg.data.val_fraction, run.cfg.data.text_field
    index: dict[str, int] = {}
    buf: dict[int, list[np.ndarray]] = {}
    seen: dict[int, int] = {}
    origin: dict[int, str] = {}
    per_source: dict[str, int] = dict.fromkeys(sources, 0)  # a source that adds no token is named, never dropped

    def emit(g: int, final: bool) -> Iterator[Batch]:
        flat = np.concatenate(buf[g]) if buf[g] else np.zeros(0, np.int64)
        rows = len(flat) // seq_len
        step = rows if final else BATCH
        while rows >= step > 0:
            yield Batch(g, torch.from_numpy(flat[: step * seq_len].astype(np.int64)).view(step, seq_len))
            flat, rows = flat[step * seq_len :], rows - step
        if final and len(flat):
            yield Batch(g, torch.from_numpy(flat.astype(np.int64)).view(1, -1))
            flat = flat[:0]
        buf[g] = [flat]

    def add(name: str, src: str, ids: np.ndarray) -> Iterator[Batch]:
        if name not in index:
            index[name] = len(domains)
            domains.append(name)
            buf[index[name]], seen[index[name]], origin[index[name]] = [], 0, src
        g = index[name]
        room = max_tokens - seen[g]
        if room <= 0:
            return
        ids = ids[:room]
        seen[g] += len(ids)
        per_source[src] += len(ids)
        buf[g].append(ids)
        if sum(len(a) for a in buf[g]) >= BATCH * seq_len:
            yield from emit(g, final=False)

    for src in sources:
        label = source_label(src, set(domains))
        if src != "stdlib" and is_dataset(check_source(src)):
            ds = dataset_for(src, tok)
            docs = ds.documents("val") if split == "val" else chain(ds.documents("train"), ds.documents("val"))
            for ids in docs:
                yield from add(label, src, ids)
                if seen[index[label]] >= max_tokens:
                    break
            continue
        for doc in iter_documents(src, field):
            if split == "val" and not is_validation(doc.name, vf):
                continue
            name = doc.domain or label
            if name in index and seen[index[name]] >= max_tokens:
                if doc.domain is None:
                    break  # one domain per source: it is full
                continue
            ids = np.array([*tok.encode(doc.text, add_special_tokens=False).ids, eos], dtype=np.int64)
            yield from add(name, src, ids)
    for g in range(len(domains)):
        yield from emit(g, final=True)
    empty = [f"{domains[g]} (from {origin[g]})" for g in range(len(domains)) if seen[g] == 0]
    empty += [src for src, n in per_source.items() if n == 0 and src not in origin.values()]
    if not domains or empty:
        raise ConfigError(
            f"--data: no text to route in {', '.join(empty) or ', '.join(sources)} "
            f"with --split {split} (the split rule holds out data.val_fraction={vf} of the documents): "
            "pass --split all, or more text"
        )


def check_held_out(sources: Sequence[str], run: LoadedRun, split: str) -> None:
    """Before any routing: under --split val every source must hold at least one document the run's split kept out
    of training (a source of one document often has none); ConfigError naming each that does not."""
    if split != "val":
        return
    tok, vf, field = run.need_tokenizer(), run.cfg.data.val_fraction, run.cfg.data.text_field
    missing = []
    for src in sources:
        if src != "stdlib" and is_dataset(check_source(src)):
            found = next(iter(dataset_for(src, tok).documents("val")), None) is not None
        else:
            found = any(is_validation(doc.name, vf) for doc in iter_documents(src, field))
        if not found:
            missing.append(src)
    if missing:
        raise ConfigError(
            f"--data: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no held-out documents under "
            f"--split val (the run's split holds out data.val_fraction={vf} of each source's documents by name): use "
            "--split all to route text the run did not train on, or give more documents"
        )


def check_moe(run: LoadedRun, what: str) -> None:
    """ConfigError unless the run's model has MoE layers."""
    if not run.model.moe_layers():
        raise ConfigError(f"{what} {run.checkpoint} is a dense model (no MoE layer): there is no routing to read")


def check_same_architecture(a: LoadedRun, b: LoadedRun) -> None:
    """ConfigError unless two runs route alike: same layers, MoE layers, experts, top-k and vocabulary."""
    ca, cb = a.cfg.model, b.cfg.model
    facts = {
        "n_layers": (ca.n_layers, cb.n_layers),
        "d_model": (ca.d_model, cb.d_model),
        "vocab_size": (ca.vocab_size, cb.vocab_size),
        "MoE layers": (
            [layer.layer_idx for layer in a.model.layers if layer.is_moe],
            [layer.layer_idx for layer in b.model.layers if layer.is_moe],
        ),
        "n_experts": (ca.moe.n_experts, cb.moe.n_experts),  # type: ignore[union-attr]
        "top_k": (ca.moe.top_k, cb.moe.top_k),  # type: ignore[union-attr]
    }
    diff = [f"{k} {x} vs {y}" for k, (x, y) in facts.items() if x != y]
    if diff:
        raise ConfigError(
            f"{a.checkpoint} and {b.checkpoint} differ in architecture ({'; '.join(diff)}): routing drift "
            "compares a model with its own fine-tune or continuation"
        )
    ta, tb = a.tokenizer, b.tokenizer
    if ta is not None and tb is not None and ta.get_vocab(with_added_tokens=True) != tb.get_vocab(True):
        raise ConfigError(f"{a.checkpoint} and {b.checkpoint} use different tokenizers: their token ids differ")


def stability_checkpoint(run: LoadedRun, since: int | None) -> Path | None:
    """The earlier checkpoint routing is compared with: the one at step `since`, else the
    run's earliest complete one; None when the run has no other checkpoint."""
    root = run.checkpoint.parent
    others = [p for p in complete_checkpoints(root) if p.resolve() != run.checkpoint.resolve()]
    if since is None:
        earlier = [p for p in others if p.name < run.checkpoint.name]
        return earlier[0] if earlier else None
    match = [p for p in others if p.name == f"step-{since:06d}"]
    if not match:
        kept = ", ".join(str(int(p.name.split("-")[1])) for p in others) or "none"
        raise ConfigError(f"--since {since}: {root} has no other complete checkpoint at that step (kept: {kept})")
    return match[0]


def similarity_over_training(run: LoadedRun) -> list[dict]:
    """Expert weight similarity per MoE layer at up to 8 checkpoints of the run (first and last included)."""
    ckpts = complete_checkpoints(run.checkpoint.parent)
    ckpts = [p for p in ckpts if p.name <= run.checkpoint.name] or [run.checkpoint]
    pick = np.unique(np.linspace(0, len(ckpts) - 1, min(len(ckpts), MAX_SIMILARITY_CHECKPOINTS)).round().astype(int))
    names = [f"layers.{layer.layer_idx}.ffn" for layer in run.model.layers if layer.is_moe]
    out = []
    for i in pick:
        step = int(ckpts[i].name.split("-")[1]) if ckpts[i].name.startswith("step-") else 0
        out.append({"step": step, "layers": expert_similarity(model_tensors(ckpts[i]), names)})
    return out


def _route(model, tokens_BS: torch.Tensor, seen: list, mask_BS: torch.Tensor | None = None) -> list:
    """Run `model` on a batch (padding marked False in `mask_BS`); the captured routing per MoE layer."""
    for s in seen:
        s.clear()
    device = next(model.parameters()).device
    model(tokens_BS.to(device), mask=mask_BS.to(device) if mask_BS is not None else None)
    return [s[-1] for s in seen]


def _compare(theirs: list, mine: list, whole: list[LayerDiff], router: list[LayerDiff] | None, moes: list) -> None:
    """Count one batch of two models' routing per layer: each on its own path (`whole`) and,
    with `router`, this model's routers on the other's router inputs - what the routers
    themselves learned, apart from what the layers below them changed."""
    for i, (t, m) in enumerate(zip(theirs, mine, strict=True)):
        whole[i].add(t.routing.expert_idx_TK, m.routing.expert_idx_TK)
        if router is not None:
            router[i].add(t.routing.expert_idx_TK, moes[i].router(t.x_TD).expert_idx_TK)


@torch.no_grad()
def routing_drift(base, tuned, batches) -> list[dict]:
    """How `tuned` (a Transformer) routes against `base` on `batches` of (tokens (B, S),
    padding mask or None): per MoE layer, {"layer", "router", "total"} as LayerDiff.summary
    gives them (router: tuned's routers on base's router inputs; total: each model whole)."""
    moes = tuned.moe_layers()
    whole, router = [LayerDiff(m.cfg.n_experts) for m in moes], [LayerDiff(m.cfg.n_experts) for m in moes]
    with capture_routing(base) as seen_b, capture_routing(tuned) as seen_t:
        for tokens_BS, mask_BS in batches:
            theirs = _route(base, tokens_BS, seen_b, mask_BS)
            _compare(theirs, _route(tuned, tokens_BS, seen_t, mask_BS), whole, router, moes)
    layers = [layer.layer_idx for layer in tuned.layers if layer.is_moe]
    return [
        {"layer": i, "router": r.summary(), "total": t.summary()} for i, r, t in zip(layers, router, whole, strict=True)
    ]


@torch.no_grad()
def analyse(
    run: LoadedRun,
    sources: Sequence[str],
    *,
    base: LoadedRun | None = None,
    earlier: LoadedRun | None = None,
    split: str = "val",
    max_tokens: int = 50_000,
) -> dict:
    """Route each domain's text through `run` (and through `base` and `earlier`, if given,
    on the same tokens) and return the counts and comparisons as experts.json holds them."""
    tok = run.need_tokenizer()
    table = TokenTable.from_tokenizer(tok, run.cfg.model.vocab_size)
    moe = run.cfg.model.moe
    moes = run.model.moe_layers()
    E, n_layers = moe.n_experts, len(moes)  # type: ignore[union-attr]
    domains: list[str] = []
    seq_len = min(run.cfg.data.seq_len, run.cfg.model.max_seq_len)
    counts = [LayerCounts(E) for _ in range(n_layers)]
    freq_V = np.zeros(run.cfg.model.vocab_size, np.int64)
    diffs = {"stability": (earlier, [LayerDiff(E) for _ in range(n_layers)])}
    if base is not None:
        diffs["total"] = (base, [LayerDiff(E) for _ in range(n_layers)])
    drift_router = [LayerDiff(E) for _ in range(n_layers)]
    tokens_per_domain: dict[int, int] = {}
    with ExitStack() as stack:
        seen = stack.enter_context(capture_routing(run.model))
        seen_other = {k: stack.enter_context(capture_routing(m.model)) for k, (m, _) in diffs.items() if m is not None}
        for b in domain_batches(sources, run, split, max_tokens, seq_len, domains):
            routes = _route(run.model, b.tokens_BS, seen)
            tokens_T = b.tokens_BS.reshape(-1)
            classes_T = table.classes(b.tokens_BS).reshape(-1)
            freq_V += np.bincount(tokens_T.numpy(), minlength=len(freq_V))
            tokens_per_domain[b.domain] = tokens_per_domain.get(b.domain, 0) + tokens_T.numel()
            for c, r in zip(counts, routes, strict=True):
                c.add(r.routing, tokens_T, classes_T, b.domain)
            for key, captured in seen_other.items():
                other, layer_diffs = diffs[key]
                theirs = _route(other.model, b.tokens_BS, captured)  # type: ignore[union-attr]
                _compare(theirs, routes, layer_diffs, drift_router if key == "total" else None, moes)
    layers = [layer.layer_idx for layer in run.model.layers if layer.is_moe]
    total = int(freq_V.sum())
    result: dict = {
        "model": str(run.checkpoint),
        "base": str(base.checkpoint) if base is not None else None,
        "earlier": str(earlier.checkpoint) if earlier is not None else None,
        "split": split,
        "domains": domains,
        "tokens": {d: tokens_per_domain.get(g, 0) for g, d in enumerate(domains)},
        "n_experts": E,
        "top_k": moe.top_k,  # type: ignore[union-attr]
        "classes": list(CLASSES),
        "layers": [
            _layer_result(i, c, len(domains), table, freq_V, total) for i, c in zip(layers, counts, strict=True)
        ],
    }
    if earlier is not None:
        result["stability"] = [{"layer": i} | d.summary() for i, d in zip(layers, diffs["stability"][1], strict=True)]
    if base is not None:
        result["drift"] = [
            {"layer": i, "router": r.summary(), "total": t.summary()}
            for i, r, t in zip(layers, drift_router, diffs["total"][1], strict=True)
        ]
    return result


def _show(text: str) -> str:
    """A token's text made visible: spaces, newlines and tabs as marks."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def _layer_result(
    layer: int, c: LayerCounts, n_domains: int, table: TokenTable, freq_V: np.ndarray, total: int
) -> dict:
    share = c.share_E
    assign_GE = c.domains(n_domains)
    by_domain = assign_GE / np.maximum(c.assign_GE.sum(1, keepdims=True), 1)
    by_class = c.class_CE / np.maximum(c.class_CE.sum(0, keepdims=True), 1)
    return {
        "layer": layer,
        "tokens": c.tokens,
        "share": share.tolist(),
        "dead": [e for e in range(c.n_experts) if share[e] < 0.1 / c.n_experts],
        "domain_share": by_domain.tolist(),  # [domain][expert]: of the domain's assignments, the expert's share
        "domain_dependence": domain_dependence(assign_GE),
        "class_share": by_class.T.tolist(),  # [expert][class]: of the expert's assignments, each class's share
        "class_dependence": domain_dependence(c.class_CE),
        "overall_class_share": (c.class_CE.sum(1) / max(c.class_CE.sum(), 1)).tolist(),
        "top_tokens": [
            [{"id": t, "text": _show(table.texts[t]), "lift": lift, "count": n} for t, lift, n in per]
            for per in c.top_tokens(freq_V, total)
        ],
        "confidence_mean": c.conf_sum / max(c.tokens, 1),
        "confidence_hist": c.conf_hist.tolist(),
        "coactivation": c.coact_EE.tolist(),
        "coactivation_lift": c.coactivation_lift().tolist(),
    }


def load_for_experts(path: str, what: str) -> LoadedRun:
    """A run or checkpoint with its tokenizer, checked to have MoE layers."""
    run = load_run(path)
    check_moe(run, what)
    if run.tokenizer is None:
        raise CheckpointError(f"{run.checkpoint.parent.parent}/tokenizer.json is missing: routing text needs it")
    return run


__all__ = ["analyse", "domain_batches", "load_for_experts", "routing_drift", "similarity_over_training"]
