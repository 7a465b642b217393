"""`moelab experts` end to end: load the run(s), route the text, write experts.json, the
PNGs and a self-contained report.html (in the style of `moelab compare`)."""

from __future__ import annotations

import html
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ...data.sources import check_source  # noqa: E402
from ...store.checkpoint import resolve_checkpoint  # noqa: E402
from ...store.outputs import staged_output, write_json  # noqa: E402
from ...store.run import load_run  # noqa: E402
from ..html import img, save_png  # noqa: E402
from ..html import page as html_page  # noqa: E402
from . import findings  # noqa: E402
from .analyse import (  # noqa: E402
    analyse,
    check_held_out,
    check_same_architecture,
    load_for_experts,
    similarity_over_training,
    stability_checkpoint,
)
from .routes import CLASSES, CONF_BINS, percent  # noqa: E402

MAX_PLOTTED_LAYERS = 6


def run_experts(
    runs: list[str],
    data: list[str],
    out: Path,
    *,
    max_tokens: int = 50_000,
    split: str = "val",
    since: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Analyse runs[-1] (with runs[0] as the base when two are given) on `data` and write
    the report to `out`; returns experts.json's content."""
    for src in data:  # a missing source is named before any model is loaded
        if src != "stdlib":
            check_source(src)
    run_dirs = [resolve_checkpoint(r).parent.parent for r in runs]  # a checkpoint's whole run is an input too
    with staged_output(out, overwrite=overwrite, protect=[*runs, *run_dirs, *data], kind="experts") as tmp:
        model = load_for_experts(runs[-1], "RUN" if len(runs) == 1 else "TUNED")
        base = load_for_experts(runs[0], "BASE") if len(runs) == 2 else None
        if base is not None:
            check_same_architecture(base, model)
        earlier_ckpt = stability_checkpoint(model, since) if base is None else None
        earlier = load_run(earlier_ckpt) if earlier_ckpt is not None else None
        check_held_out(data, model, split)
        findings_note = f"routing {', '.join(data)} ({split} split, up to {max_tokens:,} tokens per domain)"
        print(f"experts: {findings_note} through {model.checkpoint}", file=sys.stderr, flush=True)
        res = analyse(model, data, base=base, earlier=earlier, split=split, max_tokens=max_tokens)
        res["expert_similarity"] = similarity_over_training(model)
        if base is not None:
            res["alarms"] = findings.alarms(res["drift"], res["n_experts"])
            res["advice"] = findings.advice(res["drift"], res["alarms"], model.cfg, res["top_k"])
        res["summary"] = findings.summary(res)
        write_json(tmp / "experts.json", res)
        write_page(tmp, res)
    return res


def plotted_layers(res: dict) -> list[int]:
    """Indices (into res['layers']) of the layers drawn: all, or 6 spread from first to last."""
    n = len(res["layers"])
    return sorted(set(np.linspace(0, n - 1, min(n, MAX_PLOTTED_LAYERS)).round().astype(int).tolist()))


def _grid(n: int, w: float = 3.4, h: float = 3.0):
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False)
    return fig, axes[0]


def plot_shares(out: Path, res: dict, pick: list[int]) -> Path:
    """Per plotted layer: each expert's share of assignments, split by token class."""
    fig, axes = _grid(len(pick))
    colors = [plt.get_cmap("tab10")(c) for c in range(len(CLASSES))]
    for ax, i in zip(axes, pick, strict=True):
        lay = res["layers"][i]
        share, cls = np.array(lay["share"]), np.array(lay["class_share"])  # (E,), (E, C)
        bottom = np.zeros(len(share))
        for c, name in enumerate(CLASSES):
            ax.bar(range(len(share)), share * cls[:, c], bottom=bottom, color=colors[c], label=name)
            bottom += share * cls[:, c]
        ax.axhline(1 / len(share), color="k", lw=0.8, ls="--")
        if len(share) <= 16:
            ax.set_xticks(range(len(share)))
        ax.set_title(f"layer {lay['layer']}: share by token class", fontsize=9)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("share of assignments")
    axes[0].legend(fontsize=6)
    return save_png(fig, out / "expert_shares.png")


def plot_heatmaps(out: Path, res: dict, pick: list[int], key: str, title: str, name: str) -> Path:
    """One heatmap per plotted layer of `key` (a [row][expert] matrix)."""
    fig, axes = _grid(len(pick), h=max(2.4, 0.5 * len(res["layers"][0][key]) + 1.6))
    for ax, i in zip(axes, pick, strict=True):
        m = np.array(res["layers"][i][key])
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {res['layers'][i]['layer']}: {title}", fontsize=9)
        ax.set_xlabel("expert")
        if key == "domain_share":
            ax.set_yticks(range(len(res["domains"])), res["domains"], fontsize=7)
        else:
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_png(fig, out / name)


def plot_confidence(out: Path, res: dict, pick: list[int]) -> Path:
    """The distribution of the top-1 gate probability, one line per plotted layer."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    edges = (np.arange(CONF_BINS) + 0.5) / CONF_BINS
    for i in pick:
        h = np.array(res["layers"][i]["confidence_hist"], float)
        ax.plot(edges, h / max(h.sum(), 1), marker="o", ms=3, label=f"layer {res['layers'][i]['layer']}")
    ax.axvline(1 / res["n_experts"], color="k", lw=0.8, ls="--")
    ax.set_xlabel("top-1 gate probability")
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=7)
    return save_png(fig, out / "router_confidence.png")


def plot_changes(out: Path, res: dict) -> Path | None:
    """Tokens whose top-k set changed per layer: over training and (with a base) in the fine-tune."""
    bars = []
    if res.get("stability"):
        bars.append(("over training", [s["topk_changed"] for s in res["stability"]]))
    if res.get("drift"):
        bars.append(("fine-tune: router alone", [d["router"]["topk_changed"] for d in res["drift"]]))
        bars.append(("fine-tune: whole model", [d["total"]["topk_changed"] for d in res["drift"]]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(res["layers"]) + 3), 3.2))
    x = np.arange(len(res["layers"]))
    w = 0.8 / len(bars)
    for j, (label, v) in enumerate(bars):
        ax.bar(x + j * w, v, w, label=label)
    ax.set_xticks(x + w * (len(bars) - 1) / 2, [str(lay["layer"]) for lay in res["layers"]])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"tokens whose top-{res['top_k']} set changed")
    ax.legend(fontsize=7)
    return save_png(fig, out / "routing_changes.png")


def plot_similarity(out: Path, res: dict) -> Path | None:
    """Mean pairwise cosine of the experts' weights at each analysed checkpoint, per layer."""
    pts = res.get("expert_similarity") or []
    if len(pts) < 2 or all(v is None for p in pts for v in p["layers"]):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, lay in enumerate(res["layers"]):
        ax.plot(
            [p["step"] for p in pts], [p["layers"][i] for p in pts], marker="o", ms=3, label=f"layer {lay['layer']}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean pairwise cosine of experts")
    ax.legend(fontsize=7)
    return save_png(fig, out / "expert_similarity.png")


def _layer_table(res: dict, i: int) -> str:
    lay = res["layers"][i]
    rows = []
    for e, share in enumerate(lay["share"]):
        cls = lay["class_share"][e]
        top_c = int(np.argmax(cls))
        dom = [row[e] for row in lay["domain_share"]]
        top_d = int(np.argmax(dom)) if dom else 0
        toks = " ".join(f"<code>{html.escape(t['text'])}</code>×{t['lift']:.1f}" for t in lay["top_tokens"][e][:6])
        rows.append(
            f"<tr><td>{e}</td><td>{percent(share)}</td><td>{CLASSES[top_c]} ({percent(cls[top_c])})</td>"
            f"<td>{html.escape(res['domains'][top_d])} ({percent(dom[top_d])})</td><td>{toks}</td></tr>"
        )
    return (
        f"<h3>layer {lay['layer']}: domain dependence {lay['domain_dependence']:.2f}, token-class dependence "
        f"{lay['class_dependence']:.2f}</h3><table><tr><th>expert</th><th>share</th><th>main token class</th>"
        "<th>domain it takes most of</th><th>characteristic tokens (× lift over the text)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _diff_table(res: dict) -> str:
    rows = []
    for lay in res["layers"]:
        cells = [str(lay["layer"])]
        st = next((s for s in res.get("stability") or [] if s["layer"] == lay["layer"]), None)
        dr = next((d for d in res.get("drift") or [] if d["layer"] == lay["layer"]), None)
        if st:
            cells += [percent(st["top1_changed"]), percent(st["topk_changed"]), percent(st["topk_kept"])]
            cells.append(f"{st['usage_js_bits']:.4f}")
        if dr:
            for part in ("router", "total"):
                cells += [percent(dr[part]["top1_changed"]), percent(dr[part]["topk_changed"])]
            cells.append(f"{dr['total']['usage_js_bits']:.4f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["layer"]
    if res.get("stability"):
        head += ["top-1 changed (training)", "top-k changed (training)", "experts kept (training)", "usage JS (bits)"]
    if res.get("drift"):
        head += ["top-1 changed (router)", "top-k changed (router)", "top-1 changed (model)", "top-k changed (model)"]
        head.append("usage JS (bits)")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def write_page(out: Path, res: dict) -> Path:
    """OUT/report.html with every figure embedded."""
    pick = plotted_layers(res)
    figs = [plot_shares(out, res, pick)]
    if len(res["domains"]) > 1:
        figs.append(plot_heatmaps(out, res, pick, "domain_share", "share of each domain", "domains.png"))
    if res["top_k"] > 1:
        figs.append(plot_heatmaps(out, res, pick, "coactivation_lift", "co-activation lift", "coactivation.png"))
    figs.append(plot_confidence(out, res, pick))
    changes, sim = plot_changes(out, res), plot_similarity(out, res)
    text = "".join(f"<p>{html.escape(t)}</p>" for t in res["summary"])
    drift = ""
    if res.get("drift"):
        al = "".join(f"<p><b>alarm</b>: {html.escape(a)}</p>" for a in res["alarms"]) or "<p>No alarms.</p>"
        drift = f"<h2>Routing drift against {html.escape(res['base'])}</h2>{al}<p>{html.escape(res['advice'])}</p>"
    diff = _diff_table(res) if res.get("stability") or res.get("drift") else ""
    tokens = ", ".join(f"{html.escape(d)}: {n:,}" for d, n in res["tokens"].items())
    shown = "" if len(pick) == len(res["layers"]) else f"<p>Layers shown: {len(pick)} of {len(res['layers'])}.</p>"
    body = f"""<h1>What the experts learned: {html.escape(res["model"])}</h1>
<p>Tokens routed ({html.escape(res["split"])} split): {tokens}. {res["n_experts"]} experts, top-{res["top_k"]}.</p>
<h2>Summary</h2>{text}{drift}
<h2>Experts</h2>{shown}{"".join(img(p) for p in figs)}
{"".join(_layer_table(res, i) for i in pick)}
<h2>Routing changes</h2>{diff or "<p>One checkpoint and no base model: nothing to compare.</p>"}
{img(changes) if changes else ""}{img(sim) if sim else ""}"""
    page = html_page("moelab experts", body, width=1200, text_column="last")
    path = out / "report.html"
    path.write_text(page)
    return path
