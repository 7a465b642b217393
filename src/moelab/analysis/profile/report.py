"""`moelab profile`'s inputs and outputs: a recipe or a run's checkpoint and its data in;
the side-by-side table, the sentence that says what the MoE's extra step time is made
of, the imbalance meter, profile.json and Chrome traces out (see `analysis.profile`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ...errors import ConfigError
from ...parallel.mesh import Parallel, close_parallel, init_parallel
from ...run_config import apply_overrides, config_from_dict, load_config
from ...runtime import pick_device, set_cpu_threads
from ...store.outputs import staged_output, write_json
from ...store.run import load_run
from ...train.setup import run_data
from .timing import ROWS, PhaseTable, profile_variants

OTHER_ROWS = ("forward, other", "backward, other", "step, other")


def _inputs(src: str, data: str | None, overrides: list[str]):
    """(config, weights or None, tokenizer path or None) of a run folder/checkpoint or a recipe."""
    if Path(src).is_dir():
        other = [o for o in overrides if not o.startswith("parallel.")]  # the process layout belongs to a launch
        if other:
            raise ConfigError(
                f"{src}: {other[0]}: a run is profiled as it was trained; only parallel.* (the layout) may be given"
            )
        run = load_run(src, device="cpu")  # every key, shape and value checked
        cfg = config_from_dict(apply_overrides(run.cfg.to_dict(), overrides))
        cfg.data.source = data or cfg.data.source
        return cfg, run.model.state_dict(), run.tokenizer_file
    cfg = load_config(src, overrides)
    cfg.data.source = data or cfg.data.source
    return cfg, None, cfg.data.tokenizer


def run_profile(
    src: str,
    data: str | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    out: Path | None = None,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> dict:
    """Profile `src` (recipe, YAML, run or checkpoint) and, for an MoE, its dense twin and
    its balanced-routing self; writes OUT/profile.json and OUT/trace*.json when `out` is
    given. Returns what profile.json holds."""
    cfg, state, tok = _inputs(src, data, overrides or [])
    if cfg.quant.bits or cfg.finetune.recipe == "lora":
        raise ConfigError(f"{src}: a quantized or LoRA run is not a training setup; profile its base or recipe")
    cfg.validate()
    par = init_parallel(cfg)  # under torchrun: every rank profiles its part, rank 0 reports
    try:
        return _profile(cfg, src, state, tok, steps, warmup, rounds, out, overwrite, par)
    finally:
        close_parallel(par)


def _profile(cfg, src, state, tok, steps, warmup, rounds, out, overwrite, par: Parallel | None) -> dict:
    main = par is None or par.is_main
    device = par.device if par is not None else pick_device(cfg.train.device)
    if device.type == "cpu":
        set_cpu_threads(cfg.train.threads)
    if par is not None and not main:
        par.barrier()  # rank 0 tokenizes (and caches) the data first
    data = run_data(cfg, tok)
    if par is not None and main:
        par.barrier()
    if state is None and main:
        print(f"profiling {cfg.name} (a fresh init: its routing is not a trained router's)", file=sys.stderr)
    if out is None or not main:
        return _result(cfg, src, profile_variants(cfg, state, data, device, steps, warmup, rounds, None, par), par)
    with staged_output(out, overwrite=overwrite, protect=[src, cfg.data.source], kind="profile") as tmp:
        result = _result(cfg, src, profile_variants(cfg, state, data, device, steps, warmup, rounds, tmp, par), par)
        write_json(tmp / "profile.json", result)
    return result


def profile_runs(run_dirs: list[Path], steps: int = 3, rounds: int = 3) -> list[tuple[PhaseTable, PhaseTable | None]]:
    """A short profile of each run's last checkpoint for the compare report: (its table,
    the same weights with balanced routing for an MoE, else None), one process each."""
    out = []
    for run_dir in run_dirs:
        cfg, state, tok = _inputs(str(run_dir), None, [])
        device = pick_device(cfg.train.device)
        # three rounds: a figure carries its spread, and none is stated where the rounds disagree beyond it
        tables = profile_variants(cfg, state, run_data(cfg, tok), device, steps, warmup=1, rounds=rounds, twin=False)
        out.append((tables[0], tables[1] if len(tables) > 1 else None))
    return out


def _result(cfg, src: str, tables: list[PhaseTable], par: Parallel | None) -> dict:
    ep = par.layout.expert if par is not None else 1
    res: dict = {
        "source": src,
        "name": cfg.name,
        "world": par.world if par is not None else 1,
        "expert_parallel": ep,
        "steps": tables[0].steps,
        "tables": [t.to_json() for t in tables],
    }
    if len(tables) == 3:
        res["overhead"] = moe_overhead(tables[0], tables[1])
        res["imbalance"] = imbalance(tables[0], tables[2], ep)
    return res


def moe_overhead(moe: PhaseTable, dense: PhaseTable) -> dict:
    """The MoE step's time beyond the dense twin's, in points of the dense step, by phase: every phase by its name
    (the optimizer's Muon on matrices, Muon on expert stacks and AdamW parts each on its own), the expert matmuls
    against the dense FFN, and what no phase holds; plus the sentence that says it."""
    base = dense.plain_ms

    def pts(rows_moe, rows_dense=None) -> float:
        rows_dense = rows_moe if rows_dense is None else rows_dense
        return (sum(moe.row_ms(r) for r in rows_moe) - sum(dense.row_ms(r) for r in rows_dense)) / base * 100

    named = [r for r in ROWS if r not in OTHER_ROWS and r not in ("experts", "ffn")]
    terms = {r: pts([r]) for r in named}
    terms["expert matmuls vs the dense FFN"] = pts(["experts", "ffn"], ["ffn"])
    other = pts(OTHER_ROWS)
    total = (moe.plain_ms - dense.plain_ms) / base * 100
    explained = sum(terms.values()) / total if abs(total) > 1e-9 else 1.0
    spread, reliable, why = _agreement(total, moe, dense)
    if not reliable:
        sentence = f"the MoE step ({moe.plain_ms:.1f} ms) against the dense twin's ({dense.plain_ms:.1f} ms): {why}"
    else:
        shown = ", ".join(
            f"{k} {v:+.1f}" for k, v in sorted(terms.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 0.5
        )
        lead = f"the MoE step takes {abs(total):.0f}% {'more' if total >= 0 else 'less'} time than the dense twin's"
        rounds = f"; timing rounds within {spread:.0f}%" if spread is not None else "; one timing round"
        sentence = (
            f"{lead} ({moe.plain_ms:.1f} vs {dense.plain_ms:.1f} ms{rounds}); in points of the dense step: "
            f"{shown or 'none'}; outside any phase {other:+.1f}"
        )
    terms = {k: v for k, v in terms.items() if v != 0.0}
    return {"percent": total, "points": terms, "unattributed_points": other, "explained": explained, "text": sentence,
            "spread_percent": spread, "reliable": reliable}  # fmt: skip


NOISY_ROUNDS_PCT = 50.0  # rounds further apart than this: the machine was busy, no figure of the step is stated


def _agreement(total_pct: float, *tables: PhaseTable) -> tuple[float | None, bool, str]:
    """(the tables' widest round spread in percent or None, whether a percentage may be stated, why not)."""
    spreads = [t.spread_pct for t in tables if t.spread_pct is not None]
    spread = max(spreads) if spreads else None
    if spread is None:
        return None, True, ""
    if spread > NOISY_ROUNDS_PCT:
        return (
            spread,
            False,
            (
                f"the timing rounds disagree by {spread:.0f}% (a busy machine?), so no percentage is stated; "
                "profile again with nothing else running"
            ),
        )
    if abs(total_pct) <= spread:
        return (
            spread,
            False,
            (
                f"they differ by {abs(total_pct):.0f}%, within the {spread:.0f}% their timing rounds disagree by, "
                "so no difference is stated"
            ),
        )
    return spread, True, ""


def _max_over_mean(xs: list[float]) -> float:
    return max(xs) / (sum(xs) / len(xs)) if sum(xs) else 1.0


def imbalance(learned: PhaseTable, forced: PhaseTable, expert_parallel: int = 1) -> dict:
    """What routing imbalance costs: the step and the expert matmuls with the learned
    routing against the same weights with balanced routing, and each MoE layer's busiest
    expert as a multiple of the mean load. Under expert parallelism also the busiest rank's
    rows (max over mean, per layer) and each rank's share of the step spent in the
    all-to-all, waiting for the busiest rank included."""
    cost = (learned.plain_ms - forced.plain_ms) / learned.plain_ms * 100
    experts = [_max_over_mean(lo) for lo in learned.loads]
    exp_l, exp_b = learned.row_ms("experts"), forced.row_ms("experts")
    # each MoE layer's expert matmuls, learned vs balanced (scaled to the unprofiled step)
    per_layer = [
        (a["experts"] * learned.scale, b["experts"] * forced.scale)
        for a, b in zip(learned.layers, forced.layers, strict=True)
        if "experts" in a and "experts" in b
    ]
    layers = "; ".join(f"{m:.2f}x, {a:.1f} vs {b:.1f} ms" for m, (a, b) in zip(experts, per_layer, strict=False))
    text = (
        f"routing imbalance costs {cost:+.0f}% of step time ({learned.plain_ms:.1f} ms learned vs "
        f"{forced.plain_ms:.1f} ms balanced; expert matmuls {exp_l:.1f} vs {exp_b:.1f} ms); per MoE layer, the "
        f"busiest expert's load over the mean and its expert matmuls learned vs balanced: {layers}"
    )
    res: dict = {
        "percent": cost,
        "experts_ms": [exp_l, exp_b],
        "max_over_mean": experts,
        "experts_ms_per_layer": per_layer,
        "text": text,
    }
    if expert_parallel > 1:
        per_rank = [
            _max_over_mean([sum(c) for c in _chunks(lo, expert_parallel)]) for lo in learned.loads
        ]  # experts are split over the EP ranks in contiguous slices
        wait = {t.name: [_share(r, "all-to-all") for r in t.ranks] for t in (learned, forced)}
        res |= {"rank_max_over_mean": per_rank, "all_to_all_share": wait}
        res["text"] += (
            f"; busiest expert-parallel rank per layer: {', '.join(f'{m:.2f}x' for m in per_rank)} the mean rows; "
            "share of the step in the all-to-all (waiting included), rank by rank: "
            + "; ".join(f"{n} {', '.join(f'{100 * s:.0f}%' for s in v)}" for n, v in wait.items())
        )
    return res


def _chunks(xs: list[float], n: int) -> list[list[float]]:
    size = len(xs) // n
    return [xs[i * size : (i + 1) * size] for i in range(n)]


def _share(rank: dict, row: str) -> float:
    return (rank["fwd_ms"].get(row, 0.0) + rank["bwd_ms"].get(row, 0.0)) / max(rank["phases_ms"], 1e-9)


def format_tables(res: dict) -> str:
    """The variants side by side: forward, backward and total ms per step and share, by phase."""
    tables = res["tables"]
    w = max(len(r) for r in ROWS)
    head = f"{'phase':<{w}}" + "".join(f" | {t['name'][:22]:>22} {'':>6}" for t in tables)
    sub = f"{'':<{w}}" + "".join(f" | {'fwd':>6} {'bwd':>6} {'ms':>7} {'%':>6}" for _ in tables)
    lines = [head, sub, "-" * len(sub)]
    for row in ROWS:
        if not any(row in t["rows_ms"] for t in tables):
            continue
        cells = ""
        for t in tables:
            if row not in t["rows_ms"]:
                cells += f" | {'':>6} {'':>6} {'-':>7} {'':>6}"
                continue
            f, b = t["fwd_ms"].get(row, 0.0) * t["scale"], t["bwd_ms"].get(row, 0.0) * t["scale"]
            cells += f" | {f:6.1f} {b:6.1f} {f + b:7.1f} {100 * (f + b) / t['plain_ms']:5.1f}%"
        lines.append(f"{row:<{w}}{cells}")
    lines.append(f"{'step':<{w}}" + "".join(f" | {'':>6} {'':>6} {t['plain_ms']:7.1f} {100:5.1f}%" for t in tables))
    lines.append(f"{'tokens/s':<{w}}" + "".join(f" | {'':>6} {'':>6} {t['tokens_per_s']:7.0f} {'':>6}" for t in tables))
    if tables[0]["ranks"]:  # under torchrun: how far the ranks' own steps spread
        per = [f"{t['name']} " + ", ".join(f"{r['phases_ms']:.1f}" for r in t["ranks"]) for t in tables]
        lines.append(f"(profiled ms/step rank by rank: {'; '.join(per)}; the table is rank 0's)")
    over = [f"{t['name']} {t['profiled_ms'] / t['plain_ms']:.2f}x" for t in tables]
    lines.append(f"(profiled step / plain step: {', '.join(over)}; rows scaled to the plain step)")
    spreads = [f"{t['name']} {t['spread_pct']:.0f}%" for t in tables if t.get("spread_pct") is not None]
    if spreads:
        lines.append(f"(the plain step is the median round; rounds' spread, slowest - fastest: {', '.join(spreads)})")
    return "\n".join(lines)
