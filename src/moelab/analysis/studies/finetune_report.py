"""`moelab finetune-report`: does fine-tuning generalise, dense vs MoE, recipe by recipe?

1. Pretrain each base recipe on the pretraining data (reused when OUT/pretrain/BASE
   already holds its final checkpoint).
2. Fine-tune every base with every variant that applies to it (dense models have no
   experts or router) on the same seeded sample of training examples, with the same
   steps, batch, seed and learning rate (LoRA gets its own, as is usual).
3. Score each result with one function, in eval mode: loss on the training examples
   it saw and on the held-out split (other modules, for stdlib-docstrings); the gap is
   their difference. The pretrained base is scored the same way (step 0 of the curves).
   For an MoE base, the routing drift on the held-out examples too (`moelab experts`):
   the share of tokens whose top-k set the fine-tuned routers change on the base's own
   router inputs, and through the whole model.

Everything lands in OUT (report.json, report.md, heldout_loss.png); `--doc FILE`
also replaces the part of FILE between the report markers and puts the plot in
FILE's images/ folder. Finished runs made with the same settings are reused, so an
interrupted report continues where it stopped; other settings redo a fine-tune and
are refused for a pretraining run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ...config import ConfigError  # noqa: E402
from ...finetune.run import finetune, finetune_data  # noqa: E402
from ...run_config import load_config, read_config  # noqa: E402
from ...store.checkpoint import check_checkpoint, latest_checkpoint  # noqa: E402
from ...store.outputs import write_json  # noqa: E402
from ...store.run import load_run  # noqa: E402
from ...train import train  # noqa: E402
from ...train.evaluate import evaluate  # noqa: E402
from ..experts.analyse import routing_drift  # noqa: E402
from ..html import save_png  # noqa: E402
from .curves import read_run  # noqa: E402

BEGIN, END = "<!-- finetune-report:begin -->", "<!-- finetune-report:end -->"


@dataclass(frozen=True)
class Variant:
    """One fine-tuning variant of the report: a label, the `moelab finetune` recipe, its overrides, and which bases it
    applies to (all, moe or dense)."""

    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    models: str = "all"  # "moe": needs experts and a router; "dense": needs dense FFNs


VARIANTS = (
    Variant("full", "full"),
    Variant("full + expert dropout 0.2", "full", ("finetune.expert_dropout=0.2",), "moe"),
    Variant("full, aux loss off", "full", ("finetune.aux_loss=off",), "moe"),
    Variant("freeze-experts", "freeze-experts", (), "moe"),
    Variant("freeze-router", "freeze-router", (), "moe"),
    Variant("experts-only", "experts-only", (), "moe"),
    Variant("lora (attn + experts)", "lora", ("lora.targets=attn,experts",), "moe"),
    Variant("lora (attn + ffn)", "lora", ("lora.targets=attn,ffn",), "dense"),
)


def slug(label: str) -> str:
    """A label as a folder name: lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def final_step(run: Path) -> int | None:
    """The step of a run folder's latest complete checkpoint, or None when it has none."""
    ck = latest_checkpoint(run / "checkpoints")
    return int(check_checkpoint(ck)["step"]) if ck else None


def pretrain(base: str, out: Path, data: str, steps: int | None, overrides: list[str], quiet: bool) -> Path:
    """Pretrain (or reuse, or resume) base recipe `base` on `data` in OUT/pretrain/BASE; returns the run folder. A
    reused run must have been made with the same settings."""
    cfg = load_config(base, overrides)
    cfg.data.source = data
    if steps is not None:
        cfg.train.steps = steps
    cfg.validate()
    run = out / "pretrain" / base
    done = final_step(run) if run.exists() else None
    if done is not None and read_config(run / "config.yaml").to_dict() != cfg.to_dict():
        raise ConfigError(f"{run} was pretrained with other settings (see its config.yaml): use another --out")
    if done == cfg.train.steps:
        return run
    if done is not None and done > cfg.train.steps:
        raise ConfigError(f"{run} was pretrained for {done} steps, not {cfg.train.steps}: use another --out")
    print(f"pretraining {base} for {cfg.train.steps} steps on {data} -> {run}", file=sys.stderr)
    train(cfg, run, resume=done is not None, overwrite=done is None, quiet=quiet)
    return run


def score(r, cfg, data_src: str) -> tuple[float, float, int]:
    """(train loss, held-out loss, held-out examples) in eval mode; `cfg` picks the examples."""
    data = finetune_data(cfg, data_src, r.need_tokenizer(), r.checkpoint.parent.parent, verbose=False)
    bs, device = cfg.train.batch_size, next(r.model.parameters()).device
    n_train = min(len(data.train), 1024)  # enough for a stable mean, bounded cost
    return (
        evaluate(r.model, data.train, bs, math.ceil(n_train / bs), device, nullcontext()),
        evaluate(r.model, data.val, bs, math.ceil(len(data.val) / bs), device, nullcontext()),
        len(data.val),
    )


def run_report(
    out: Path,
    bases: list[str],
    *,
    data: str = "stdlib-docstrings",
    pretrain_data: str = "stdlib",
    pretrain_steps: int | None = None,
    pretrain_overrides: Sequence[str] = (),
    steps: int = 100,
    train_examples: int = 400,
    lr: float = 1e-3,
    lora_lr: float = 3e-3,
    batch_size: int = 16,
    ft_overrides: Sequence[str] = (),
    doc: Path | None = None,
    command: str = "",
    quiet: bool = False,
) -> dict:
    """Pretrain each base, fine-tune it with every applicable variant, score train and held-out loss, write report.json,
    report.md and heldout_loss.png in `out` (and the section of `doc`); returns the report as a dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "bases": bases,
        "data": data,
        "pretrain_data": pretrain_data,
        "pretrain_steps": pretrain_steps,
        "steps": steps,
        "train_examples": train_examples,
        "batch_size": batch_size,
        "lr": lr,
        "lora_lr": lora_lr,
        "command": command,
    }
    rows: list[dict] = []
    curves: dict[str, list] = {}
    for base in bases:
        base_run = pretrain(base, out, pretrain_data, pretrain_steps, list(pretrain_overrides), quiet)
        loaded = load_run(base_run)
        cfg = loaded.cfg
        # the base is scored on the same examples its fine-tunes see
        cfg.finetune.train_examples, cfg.train.batch_size = train_examples, batch_size
        tr0, ho0, n_val = score(loaded, cfg, data)
        base_model = loaded.model if cfg.model.moe is not None else None
        del loaded
        row = {"base": base, "variant": "(pretrained, not fine-tuned)", "trainable": 0, "tokens_per_s": None}
        rows.append(row | {"train_loss": tr0, "heldout_loss": ho0, "gap": ho0 - tr0})
        kind = "moe" if cfg.model.moe is not None else "dense"
        for v in VARIANTS:
            if v.models in ("all", kind):
                ft_dir = out / "finetune" / base / slug(v.label)
                sets = _variant_settings(v, settings, n_val, ft_overrides)
                rows.append(_finetuned_row(base, base_run, v, ft_dir, sets, settings, quiet, base_model))
                curve = [(m["step"], m["val_loss"]) for m in read_run(ft_dir).records if "val_loss" in m]
                curves.setdefault(base, []).append((v.label, [(0, ho0), *curve]))
    result = {"settings": settings, "rows": rows, "curves": curves}
    _write_report(out, result, doc)
    return result


def _variant_settings(v: Variant, s: dict, n_val: int, ft_overrides: Sequence[str]) -> list[str]:
    """The overrides one variant's fine-tune runs with: the report's budget, then the variant's, then the user's."""
    steps, bs = s["steps"], s["batch_size"]
    return [
        f"finetune.train_examples={s['train_examples']}",
        f"train.batch_size={bs}",
        f"optim.lr={s['lora_lr'] if v.recipe == 'lora' else s['lr']}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        f"train.eval_every={max(1, steps // 10)}",
        f"train.eval_batches={math.ceil(n_val / bs)}",
        f"train.ckpt_every={steps}",
        "train.keep_checkpoints=1",
        "lora.rank=16",
        "lora.alpha=32",
        *v.overrides,
        *ft_overrides,
    ]


def _finetuned_row(
    base: str, base_run: Path, v: Variant, ft_dir: Path, sets: list[str], s: dict, quiet: bool, base_model=None
) -> dict:
    """Fine-tune `base_run` with variant `v` (unless a finished run with exactly these settings
    is in `ft_dir`) and score it: the report's row for it."""
    data, steps = s["data"], s["steps"]
    info, stamp = ft_dir / "finetune.json", ft_dir / "report-settings.json"
    wanted = json.dumps({"recipe": v.recipe, "data": data, "steps": steps, "overrides": sets})
    # reuse only a finished run made with exactly these settings; anything else is redone
    if not (info.is_file() and stamp.is_file() and stamp.read_text() == wanted and final_step(ft_dir) == steps):
        print(f"fine-tuning {base}: {v.label} -> {ft_dir}", file=sys.stderr)
        finetune(str(base_run), data, ft_dir, v.recipe, steps=steps, overrides=sets, overwrite=True, quiet=quiet)
        stamp.write_text(wanted)
    meta = json.loads(info.read_text())
    last = read_run(ft_dir).records[-1]
    r = load_run(ft_dir)
    tr, ho, _ = score(r, r.cfg, data)
    return {
        "base": base,
        "variant": v.label,
        "trainable": meta["trainable"],
        "total": meta["total"],
        "train_loss": tr,
        "heldout_loss": ho,
        "gap": ho - tr,
        "tokens_per_s": last["tokens"] / last["elapsed_s"] if last.get("elapsed_s") else None,
        "train_examples": meta["train_examples"],
        "heldout_examples": meta["heldout_examples"],
        **(drift(base_model, r, data) if base_model is not None else {}),
    }


def drift(base_model, r, data_src: str, max_examples: int = 256) -> dict:
    """The routing drift of fine-tuned run `r` against the base on (up to 256 of) the held-out examples: mean over MoE
    layers of the share of tokens whose top-k set changed - by the routers alone, and through the whole model."""
    data = finetune_data(r.cfg, data_src, r.need_tokenizer(), r.checkpoint.parent.parent, verbose=False)
    bs, n = r.cfg.train.batch_size, min(len(data.val), max_examples)
    batches = (data.val.batch(list(range(i, min(i + bs, n)))) for i in range(0, n, bs))
    layers = routing_drift(base_model, r.model, ((b[0], b[2]) for b in batches))
    return {
        "router_drift": sum(d["router"]["topk_changed"] for d in layers) / len(layers),
        "routing_drift": sum(d["total"]["topk_changed"] for d in layers) / len(layers),
        "drift_layers": layers,
    }


def _write_report(out: Path, result: dict, doc: Path | None) -> None:
    """report.json, heldout_loss.png and report.md in `out`; the report section of `doc`, with its image."""
    write_json(out / "report.json", result)
    plot = plot_curves(result["curves"], out / "heldout_loss.png")
    (out / "report.md").write_text(markdown(result, "heldout_loss.png"))
    if doc is not None:
        img = Path(doc).parent / "images" / "finetune_heldout_loss.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, img)
        splice(Path(doc), markdown(result, "images/finetune_heldout_loss.png"))


def plot_curves(curves: dict, path: Path) -> Path:
    """Plot held-out loss against fine-tuning step, one panel per base; returns the PNG path."""
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False, sharey=True)
    for ax, (base, runs) in zip(axes[0], curves.items(), strict=True):
        for label, pts in runs:
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
        ax.set_title(base)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out loss (nats/token, completions only)")
    save_png(fig, path, dpi=110)
    return path


def markdown(result: dict, image: str) -> str:
    """The report as Markdown: settings, one table row per variant, and the plot `image`."""
    s = result["settings"]
    head = (
        "| base | variant | trainable params | train loss | held-out loss | gap | tokens/s | router drift | "
        "routing drift |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in result["rows"]:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
        lines.append(
            f"| {r['base']} | {r['variant']} | {r['trainable']:,} | {r['train_loss']:.4f} | "
            f"{r['heldout_loss']:.4f} | {r['gap']:+.4f} | {tps} | {_pct(r.get('router_drift'))} | "
            f"{_pct(r.get('routing_drift'))} |"
        )
    return (
        "\n".join(
            [
                f"Command: `{s['command']}`" if s["command"] else "",
                "",
                f"Bases pretrained on `{s['pretrain_data']}` for {s['pretrain_steps'] or 'the recipe'} steps; "
                "each variant "
                f"fine-tuned on {s['train_examples']} `{s['data']}` training examples for {s['steps']} steps of "
                f"{s['batch_size']} (lr {s['lr']:g}, LoRA {s['lora_lr']:g}, rank 16, alpha 32). Train and held-out "
                "losses are measured after fine-tuning, in eval mode, on the completion tokens of the training "
                "examples seen and of the held-out split (whole modules, for stdlib-docstrings); "
                "gap = held-out − train. tokens/s counts real "
                "(unpadded) tokens per second of optimizer steps. Drift (MoE bases): the share of held-out tokens "
                "whose top-k set of experts changed, mean over MoE layers - router: the fine-tuned routers on the "
                "base's own router inputs; routing: through the whole fine-tuned model (`moelab experts BASE TUNED`).",
                "",
                *lines,
                "",
                f"![held-out loss over fine-tuning steps]({image})",
            ]
        ).strip()
        + "\n"
    )


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def splice(doc: Path, body: str) -> None:
    """Replace the text between the report markers of `doc` with `body` (append the section when the markers are
    missing)."""
    text = doc.read_text() if doc.is_file() else ""
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = f"{pre}{BEGIN}\n{body}{END}{post}"
    else:
        text = f"{text.rstrip()}\n\n{BEGIN}\n{body}{END}\n".lstrip()
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)
