"""What `moelab experts` concludes from its numbers: the summary sentences, the alarm lines
for experts that went dead or took over in a fine-tune, and one sentence of advice."""

from __future__ import annotations

import numpy as np

from ...run_config import RunConfig
from .routes import percent

DEAD = 0.1  # below this fraction of a uniform share an expert counts as dead
TAKEOVER = 1.5  # at or above this multiple of a uniform share (and twice its own before) it took over
MOVED = 0.2  # a router that moves more than this share of tokens by itself moved a lot


def summary(res: dict) -> list[str]:
    """Sentences for the top of the report, each computed from `res` (experts.json)."""
    layers, E, k = res["layers"], res["n_experts"], res["top_k"]
    out = []
    cls = [lay["class_dependence"] for lay in layers]
    best = int(np.argmax(cls))
    line = (
        f"Token class: routing depends on it by {np.mean(cls):.2f} on average over {len(layers)} MoE layer(s) "
        f"(max {cls[best]:.2f}, layer {layers[best]['layer']}; 0 = not at all, 1 = the expert gives the class away)."
    )
    out.append(line)
    if len(res["domains"]) > 1:
        dom = [lay["domain_dependence"] for lay in layers]
        b = int(np.argmax(dom))
        by = "by domain more than by token class" if np.mean(dom) > np.mean(cls) else "by token class more than domain"
        out.append(
            f"Domain ({', '.join(res['domains'])}): routing depends on it by {np.mean(dom):.2f} on average (max "
            f"{dom[b]:.2f}, layer {layers[b]['layer']}): the experts specialise {by}."
        )
    dead = [f"layer {lay['layer']}: {', '.join(map(str, lay['dead']))}" for lay in layers if lay["dead"]]
    out.append(
        f"Dead experts (under {DEAD:g}x a uniform share of {percent(1 / E)}): " + ("; ".join(dead) if dead else "none.")
    )
    conf = np.mean([lay["confidence_mean"] for lay in layers])
    out.append(f"Router confidence: mean top-1 gate {conf:.2f} (1/E = {1 / E:.2f} is a router that cannot decide).")
    if k > 1:
        lifts = [np.array(lay["coactivation_lift"]) for lay in layers]
        hi = max(float(m.max()) for m in lifts)
        out.append(
            f"Co-activation: the most correlated pair of experts is chosen together {hi:.1f}x as often as "
            "independent choices would be."
        )
    if res.get("stability"):
        st = res["stability"]
        out.append(
            f"Stability: between {_step(res['earlier'])} and {_step(res['model'])}, "
            f"{percent(float(np.mean([s['topk_changed'] for s in st])))} of tokens changed their top-{k} set, "
            f"keeping {percent(float(np.mean([s['topk_kept'] for s in st])))} of their experts "
            f"(means over layers; most changed in layer {max(st, key=lambda s: s['topk_changed'])['layer']})."
        )
    sim = res.get("expert_similarity") or []
    pts = [(p["step"], _mean(p["layers"])) for p in sim if _mean(p["layers"]) is not None]
    if len(pts) > 1:
        out.append(
            f"Expert weights: mean pairwise cosine {pts[0][1]:.3f} at step {pts[0][0]}, {pts[-1][1]:.3f} at step "
            f"{pts[-1][0]} (1 = identical copies, as just after upcycling)."
        )
    return out


def _mean(xs: list) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def _step(ckpt: str | None) -> str:
    name = (ckpt or "").rstrip("/").rsplit("/", 1)[-1]
    return f"step {int(name.split('-')[1])}" if name.startswith("step-") and name[5:].isdigit() else name


def alarms(drift: list[dict], n_experts: int) -> list[str]:
    """One line per expert that went dead or took over between the base and the tuned model
    (each on its own path through the layers)."""
    out = []
    uniform = 1 / n_experts
    for lay in drift:
        a, b = lay["total"]["share_a"], lay["total"]["share_b"]
        for e in range(n_experts):
            if b[e] < DEAD * uniform and a[e] >= uniform / 2:  # was in real use, now is not
                out.append(f"layer {lay['layer']}: expert {e} went dead ({percent(a[e])} -> {percent(b[e])})")
            elif b[e] >= max(TAKEOVER * uniform, 2 * a[e]):
                out.append(f"layer {lay['layer']}: expert {e} took over ({percent(a[e])} -> {percent(b[e])})")
    return out


def advice(drift: list[dict], alarm_lines: list[str], tuned: RunConfig, top_k: int) -> str:
    """One sentence on what to do, from the drift numbers and the tuned run's settings."""
    router = max(d["router"]["topk_changed"] for d in drift)
    total = max(d["total"]["topk_changed"] for d in drift)
    lb = tuned.model.moe.lb_coef if tuned.model.moe is not None else 0.0
    aux_off = tuned.finetune.recipe != "none" and not tuned.finetune.aux_loss
    if alarm_lines:
        return (
            f"Experts collapsed or took over in {len(alarm_lines)} case(s): keep the balance loss on while "
            f"fine-tuning (model.moe.lb_coef = {lb:g}{', finetune.aux_loss is off' if aux_off else ''}) or freeze the "
            "router (--recipe freeze-router), which keeps the pretrained routing."
        )
    if router == 0.0:
        if total > 0.01:
            return (
                f"The routers' weights did not move (frozen), yet up to {percent(total)} of tokens changed experts "
                "in a layer because the layers below it changed: freezing the router keeps its weights, not the "
                "routing; freeze the layers below as well to keep that."
            )
        return "Routing is unchanged: the routers and the layers below them did not move."
    if router > MOVED:
        return (
            f"The routers moved up to {percent(router)} of tokens to another top-{top_k} set by themselves: compare "
            "held-out loss with --recipe freeze-router; if that is no worse, freeze the router and keep the "
            "pretrained routing."
        )
    return (
        f"The routers moved little by themselves (up to {percent(router)} of tokens changed their top-{top_k} set; "
        f"{percent(total)} through the whole model): routing is not what this fine-tune changed."
    )
