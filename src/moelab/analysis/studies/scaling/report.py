"""`moelab scaling`'s report: scaling.json, three figures (the fitted laws over the runs, their
residuals, EL against compute) and report.html, written into the scaling folder."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from ....store.outputs import write_json
from ...html import img, page, save_png
from .law import Law

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _law(d: dict) -> Law:
    return Law(**{k: d[k] for k in ("E", "A", "alpha", "B", "beta")})


def plot_laws(out: Path, summary: dict) -> list[Path]:
    """laws.png (loss against tokens per width, runs and fitted curves), residuals.png and
    leverage.png (EL against compute, with its interval); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["runs"]
    families = list(summary["laws"])
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.2), sharey=True)
    for ax, fam in zip(axes, families, strict=True):
        law = _law(summary["laws"][fam])
        mine = [r for r in rows if r["family"] == fam and r.get("loss") is not None]
        widths = sorted({r["width"] for r in mine})
        cmap = plt.get_cmap("viridis")
        for i, w in enumerate(widths):
            rs = [r for r in mine if r["width"] == w]
            color = cmap(i / max(1, len(widths) - 1))
            n = rs[0]["params"][summary["count"]]
            ax.plot([r["tokens"] for r in rs], [r["loss"] for r in rs], "o", color=color, label=f"d={w} (N={n:,})")
            d = np.geomspace(min(r["tokens"] for r in mine) / 1.5, max(r["tokens"] for r in mine) * 1.5, 50)
            ax.plot(d, law.loss(n, d), "-", color=color, alpha=0.7)
        ax.set_xscale("log")
        ax.set_title(f"{fam}: L = {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
        ax.set_xlabel("training tokens D")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss")
    paths = [out / "laws.png"]
    save_png(fig, paths[0], dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, fam in enumerate(families):
        law = _law(summary["laws"][fam])
        mine = [r for r in rows if r["family"] == fam and r.get("loss") is not None]
        pred = [float(law.loss(r["params"][summary["count"]], r["tokens"])) for r in mine]
        ax.plot(pred, [100 * (r["loss"] - p) / p for r, p in zip(mine, pred, strict=True)], "o",
                color=COLORS[i % len(COLORS)], label=fam)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title("residuals of the fitted laws")
    ax.set_xlabel("fitted loss")
    ax.set_ylabel("measured - fitted (% of fitted)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out / "residuals.png")
    save_png(fig, paths[-1], dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, fam in enumerate(families[1:]):
        curve = [p for p in summary["leverage_curve"] if p.get("family", "moe") == fam and math.isfinite(p["el"])]
        if not curve:
            continue
        c = [p["flops"] for p in curve]
        tint = COLORS[(i + 1) % len(COLORS)]
        name = "" if fam == "moe" else f"{fam}, "
        for key, label, style in (("el", "in FLOPs", "-"), ("el_clock", "in seconds, this machine", "--")):
            ax.plot(c, [p[key] for p in curve], style, color=tint, label=f"EL {name}{label}")
            if key == "el" or len(families) == 2:
                lo = [p[f"{key}_interval"][0] for p in curve]
                hi = [p[f"{key}_interval"][1] for p in curve]
                ax.fill_between(c, lo, hi, color=tint, alpha=0.15 if key == "el" else 0.08)
    if rows:
        ax.axvline(max(r["flops"] for r in rows if r.get("flops")), color="k", ls=":", lw=0.8, label="largest grid run")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")  # a ratio: 2x and 0.5x as far from 1
    ax.set_title("efficiency leverage of the MoE over dense")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("dense compute / MoE compute at equal loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out / "leverage.png")
    save_png(fig, paths[-1], dpi=110)
    return paths


KEYS = ("E", "A", "alpha", "B", "beta", "g", "gamma")


def _row(name: str, law: dict) -> str:
    cells = [html.escape(name)]
    for k in KEYS:
        if k not in law:
            cells.append("")
            continue
        lo, hi = law["intervals"][k]
        fixed = " (fixed)" if k in law["fixed"] else ""
        cells.append(f"{law[k]:.4g} [{lo:.3g}, {hi:.3g}]{fixed}")
    cells += [f"{100 * law['rms_log']:.2f}%", str(law["n_runs"])]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_report(out: Path, summary: dict) -> Path:
    """Write scaling.json, the figures and report.html into `out`; returns the report's path."""
    write_json(out / "scaling.json", summary)
    figures = plot_laws(out, summary)
    laws = dict(summary["laws"])
    if "granular_law" in summary:
        laws["MoE, over granularity"] = summary["granular_law"]
    notes = sorted({v for law in laws.values() for v in law["fixed"].values()}) + summary.get("notes", [])
    body = [
        "<h1>When does the MoE pay? Loss laws for dense and MoE</h1>",
        "<p>" + "</p><p>".join(html.escape(s[0].upper() + s[1:] + ".") for s in summary["sentences"]) + "</p>",
        "<p>Law: L(N, D) = E + A/N<sup>alpha</sup> + B/D<sup>beta</sup>; N = active non-embedding parameters, "
        "D = training tokens; Huber loss on log L; 95% intervals from refits on runs resampled with replacement."
        + (
            " The MoE variants share one law over granularity G (Krajewski et al. 2024): A = A + g/G<sup>gamma</sup>"
            " at each variant's G; each row of a variant is that law at its G."
            if "granular_law" in summary
            else ""
        )
        + "</p>",
        "<table><tr><th>family</th>"
        + "".join(f"<th>{k}</th>" for k in KEYS)
        + "<th>rms residual</th><th>runs</th></tr>"
        + "".join(_row(f, law) for f, law in laws.items())
        + "</table>",
        *(f"<p><em>{html.escape(n)}</em></p>" for n in notes),
        *(img(p) for p in figures),
    ]
    path = out / "report.html"
    path.write_text(page("moelab scaling", "\n".join(body)))
    return path
