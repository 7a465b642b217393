"""Plots (PNG) and a self-contained HTML report (images embedded as base64)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..html import img, save_png  # noqa: E402
from ..html import page as html_page  # noqa: E402
from ..profile.timing import ROWS  # noqa: E402
from .seeds import recipe_of  # noqa: E402

MOE_CURVES = [
    ("max_violation", "max-violation (max/mean load − 1)"),
    ("router_entropy", "router entropy (nats)"),
    ("dropped_fraction", "dropped fraction"),
    ("z_loss", "router z-loss"),
    ("lb_loss", "balance loss"),
]


LOSS_AXES = (
    ("tokens", "training tokens"),
    ("flops", "training FLOPs"),
    ("seconds", "training seconds (optimizer steps; evaluation and checkpoints excluded)"),
)


def loss_figure(curves, axis: str, axis_label: str):
    """Validation loss against `axis` ("tokens", "flops" or "seconds") for every recipe: one line each (the mean of its
    seeds, in a min..max band); the figure, titled and labelled by the axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for c in curves:  # a recipe's seeds: one line (their mean) in a band (their min..max)
        groups.setdefault(recipe_of(c.name), []).append(c)
    for name, runs in groups.items():
        n = min(len(c.val_loss) for c in runs)
        xs = np.mean([getattr(c, axis)[:n] for c in runs], axis=0)
        ys = np.array([c.val_loss[:n] for c in runs])
        legend = name if len(runs) == 1 else f"{name} ({len(runs)} seeds)"
        line = ax.plot(xs, ys.mean(0), marker="o", ms=3, label=legend)[0]
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(axis_label)
    ax.set_ylabel("validation loss (nats/token)")
    if axis == "flops":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"validation loss vs {axis_label.split(' (')[0]}")
    fig.tight_layout()
    return fig


def _loss_plots(out: Path, curves) -> list[Path]:
    paths = []
    for axis, axis_label in LOSS_AXES:
        fig = loss_figure(curves, axis, axis_label)
        p = out / f"loss_vs_{axis}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _moe_plots(out: Path, c) -> list[Path]:
    recs = [r for r in c.records if r.get("moe_layers")]
    if not recs:
        return []
    steps = [r["step"] for r in recs]
    n_layers = len(recs[0]["moe_layers"])
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        load = np.array([r["moe_layers"][i]["load"] for r in recs]).T  # (E, logged steps)
        im = ax.imshow(
            load,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            extent=(steps[0], steps[-1], load.shape[0] - 0.5, -0.5),
        )
        ax.set_title(f"layer {i}: expert load")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    heat = out / f"expert_load_{c.name}.png"
    save_png(fig, heat, dpi=100)

    fig, axes = plt.subplots(1, len(MOE_CURVES), figsize=(3.4 * len(MOE_CURVES), 3))
    for ax, (key, label) in zip(axes, MOE_CURVES, strict=True):
        for i in range(n_layers):
            ax.plot(steps, [r["moe_layers"][i][key] for r in recs], label=f"layer {i}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    health = out / f"router_health_{c.name}.png"
    save_png(fig, health, dpi=100)
    return [heat, health]


def _memory_plot(out: Path, runs: list[dict]) -> Path:
    """Stacked bars of the planner's bytes (parameters, gradients, optimizer state, activations) per
    run, with the measured training memory marked beside each."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(runs), 3.6))
    keys = ("params", "grads", "optimizer", "activations")
    x = range(len(runs))
    bottom = [0.0] * len(runs)
    for k in keys:
        vals = [r["planned_bytes"][k] / 2**20 for r in runs]
        ax.bar(x, vals, 0.5, bottom=bottom, label=f"predicted: {k}")
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    measured = [r.get("train_mem_bytes") for r in runs]
    if any(m is not None for m in measured):
        ax.scatter(
            [i + 0.35 for i in x],
            [(m or 0) / 2**20 for m in measured],
            marker="D",
            color="black",
            zorder=3,
            label="measured (training state + step)",
        )
    ax.set_xticks(list(x), [r["name"] for r in runs])
    ax.set_ylabel("MiB")
    ax.set_title("Training memory: planned (bars) and measured", fontsize=10)
    ax.legend(fontsize=7)
    path = out / "memory.png"
    save_png(fig, path, dpi=100)
    return path


def _time_plot(out: Path, runs: list[dict]) -> Path:
    """One stacked bar per run: its step's milliseconds by phase (forward + backward)."""
    rows = [r for r in ROWS if any(r in run.get("time_ms", {}) for run in runs)]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(runs)))
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(runs)
    for j, row in enumerate(rows):
        ms = [run.get("time_ms", {}).get(row, 0.0) for run in runs]
        ax.barh([run["name"] for run in runs], ms, left=left, color=cmap(j % 20), label=row)
        left = [a + b for a, b in zip(left, ms, strict=True)]
    ax.set_xlabel("ms per training step (profiled, scaled to the unprofiled step)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=6, fontsize=7, frameon=False)
    path = out / "step_time.png"
    save_png(fig, path, dpi=100, bbox_inches="tight")
    return path


def _mib(v: int | None) -> float | None:
    return None if v is None else v / 2**20


def _fmt(v, spec=",.0f"):
    return "—" if v is None else format(v, spec)


def _inference_section(inf: dict) -> str:
    """Decode and prefill speed, and resident memory, of the trained runs and the MoE's dense total twin."""
    bs = inf["batches"]
    head = "".join(f"<th>decode, batch {b} (tokens/s)</th>" for b in bs)
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['params_total']:,}</td><td>{r['params_active']:,}</td>"
        f"<td>{r['prefill_tokens_per_s']:,.0f}</td>"
        + "".join(f"<td>{r['decode_tokens_per_s'][str(b)]:,.0f}</td>" for b in bs)
        + f"<td>{r['resident_bytes'] / 2**20:,.1f}</td></tr>"
        for r in inf["rows"]
    )
    text = "".join(f"<p>{html.escape(t)}</p>" for t in inf["text"])
    return f"""<h2>Inference</h2>{text}
<p>Each model decodes from a one-token prompt to its full context ({inf["context"]} tokens) through the KV cache;
prefill is one prompt filling the context; median of {inf["rounds"]} rounds, models in turn,
{html.escape(inf["machine"])}.
Resident memory is the weights plus the KV cache at batch {max(bs)}. The dense total twin has random weights
(decode speed does not depend on their values).</p>
<table><tr><th>model</th><th>params total</th><th>params active</th><th>prefill (tokens/s)</th>{head}
<th>resident (MiB)</th></tr>{rows}</table>"""


def write_report(out: Path, curves, summary: dict) -> Path:
    """Write OUT/report.html (self-contained, PNGs embedded) from the runs' curves and the summary; returns its path."""
    out = Path(out)
    loss_pngs = _loss_plots(out, curves)
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['final_val_loss']:.4f}</td><td>{_fmt(r['tokens_per_s'])}</td>"
        f"<td>{r['params_total']:,}</td><td>{r['params_active']:,}</td>"
        f"<td>{sum(r['tensor_bytes'].values()) / 2**20:,.1f}</td>"
        f"<td>{_fmt(_mib(r.get('train_mem_bytes')), ',.1f')}</td>"
        f"<td>{r['peak_mem_bytes'] / 2**20:,.0f} <small>({html.escape(r['peak_mem_kind'])})</small></td>"
        f"<td>{r['loss_spikes']}</td></tr>"
        for r in summary["runs"]
    )
    sp_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['target_val_loss']:.4f}</td>"
        f"<td>{_fmt(s['tokens_speedup'], '.2f')}</td><td>{_fmt(s['flops_speedup'], '.2f')}</td>"
        f"<td>{_fmt(s['seconds_speedup'], '.2f')}</td><td>{_fmt(s['val_loss_at_equal_flops'], '.4f')}</td></tr>"
        for n, s in summary["speedup"].items()
    )
    moe_sections = ""
    for c in curves:
        pngs = _moe_plots(out, c)
        if pngs:
            moe_sections += f"<h3>{html.escape(c.name)}: routing over training</h3>" + "".join(img(p) for p in pngs)
    text = "".join(f"<p>{html.escape(t)}</p>" for t in summary["summary"])
    inference = _inference_section(summary["inference"]) if "inference" in summary else ""
    body = f"""<h1>Dense vs MoE: what the experts cost and what they bought</h1>
<h2>Summary</h2>{text}
<h2>Runs</h2><table><tr><th>run</th><th>final val loss</th><th>tokens/s</th><th>params total</th>
<th>params active</th><th>weights+grads+optimizer (MiB, exact)</th><th>training memory (MiB, measured)</th>
<th>process peak (MiB)</th><th>loss spikes</th></tr>{rows}</table>
<h2>Memory</h2>{img(_memory_plot(out, summary["runs"]))}
<h2>Where the time goes</h2>{img(_time_plot(out, summary["runs"]))}
<h2>Speed-up against {html.escape(summary["reference"])}</h2>
<p>How many times fewer tokens, FLOPs and seconds each run needed to reach the reference's final validation
loss, interpolated on the stored curves (— = not reached within the budget).</p>
<table><tr><th>run</th><th>target loss</th><th>tokens</th><th>FLOPs</th><th>seconds</th>
<th>loss at equal FLOPs</th></tr>{sp_rows}</table>
{inference}
<h2>Validation loss</h2>{"".join(img(p) for p in loss_pngs)}
<h2>MoE layers</h2>{moe_sections or "<p>No MoE runs.</p>"}"""
    page = html_page("moelab compare", body)
    path = out / "report.html"
    path.write_text(page)
    return path
