"""compare --seeds: every recipe trained with N seeds, the verdict from the 95% interval of
the paired loss differences - recomputed here from the per-seed losses, by hand."""
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_main

from moelab.analysis.studies.seeds import paired_interval, recipe_of, verdict
from moelab.run_config import RECIPES_DIR

T_975_DF1 = 12.706  # Student's t, two-sided 95%, one degree of freedom (two seeds)


def test_interval_and_verdict_on_known_numbers():
    mean, low, high = paired_interval([4.0, 4.2], [4.5, 4.9])  # differences 0.5 and 0.7
    half = T_975_DF1 * statistics.stdev([0.5, 0.7]) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.6, 0.6 - half, 0.6 + half))
    assert verdict(low, high) == "not distinguishable at this budget"  # t with 1 df is that wide
    assert verdict(*paired_interval([4.0, 4.2, 4.1], [4.5, 4.71, 4.6])[1:]) == "behind"
    assert verdict(*paired_interval([4.5, 4.71, 4.6], [4.0, 4.2, 4.1])[1:]) == "ahead"
    assert recipe_of("tiny-moe-seed12") == "tiny-moe" and recipe_of("tiny-moe") == "tiny-moe"


def test_compare_with_two_seeds_says_identical_is_indistinguishable_and_crippled_is_behind(tmp_path, text_file,
                                                                                          capsys):
    twin = tmp_path / "twin.yaml"  # the reference recipe under another name: the same runs, seed for seed
    twin.write_text((RECIPES_DIR / "tiny-dense.yaml").read_text() + "\nname: twin\n")
    crippled = "tiny-dense+optim.lr=1.0e-12+name=crippled"  # learning rate ~0: never leaves its initial loss
    out = tmp_path / "cmp"
    run_main(capsys, "compare", "tiny-dense", str(twin), crippled, "--data", text_file, "--out", out,
             "--steps", "6", "--seeds", "2", "--jobs", "2", "--quiet",
             *[a for o in [*TINY, "train.eval_every=1"] for a in ("--set", o)])  # a point each step: the clock's
    s = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in s["runs"]] == [f"{n}-seed{i}" for n in ("tiny-dense", "twin", "crippled")
                                              for i in (0, 1)]
    final = {r["name"]: r["final_val_loss"] for r in s["runs"]}
    assert final["tiny-dense-seed0"] != final["tiny-dense-seed1"]  # the seed changed init and data order
    for name, expected in (("twin", "not distinguishable at this budget"), ("crippled", "behind")):
        v = s["seeds"][name]
        ref = [final[f"tiny-dense-seed{i}"] for i in (0, 1)]
        other = [final[f"{name}-seed{i}"] for i in (0, 1)]
        d = [b - a for a, b in zip(ref, other)]
        half = T_975_DF1 * statistics.stdev(d) / math.sqrt(2)
        assert v["interval"] == pytest.approx([statistics.fmean(d) - half, statistics.fmean(d) + half], abs=1e-12)
        assert v["verdict"] == expected, v
        assert expected in " ".join(s["summary"])
    assert [final[f"twin-seed{i}"] for i in (0, 1)] == [final[f"tiny-dense-seed{i}"] for i in (0, 1)]
    # the speed-up to the reference's final loss, with its interval: the twin reaches it no later than itself
    ups, (low, high) = s["seeds"]["twin"]["tokens_speedup"], s["seeds"]["twin"]["tokens_speedup_interval"]
    assert len(ups) == 2 and all(u >= 1.0 for u in ups) and low <= statistics.fmean(ups) <= high
    assert s["seeds"]["crippled"]["tokens_speedup"] == [None, None]
    # on the clock: each seed's losses where the shorter run's training seconds end, recomputed from metrics.jsonl
    def timed(name):
        lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return [(r["elapsed_s"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]

    def at(points, x):
        return next((y0 + (x - x0) / (x1 - x0) * (y1 - y0) for (x0, y0), (x1, y1) in zip(points, points[1:])
                     if x0 <= x <= x1), None)

    for name in ("twin", "crippled"):
        diffs = []
        for i in (0, 1):
            ref_pts, pts = timed(f"tiny-dense-seed{i}"), timed(f"{name}-seed{i}")
            x = min(ref_pts[-1][0], pts[-1][0])
            if at(pts, x) is not None and at(ref_pts, x) is not None:  # (a run 6x faster leaves no common point)
                diffs.append(at(pts, x) - at(ref_pts, x))
        clock = s["seeds"][name]["clock"]
        assert clock["equal_seconds_diff"] == pytest.approx(diffs)
        if len(diffs) < 2:
            assert "interval" not in clock and "no common training-seconds point" in clock["text"]
            continue
        half = T_975_DF1 * statistics.stdev(diffs) / math.sqrt(2)
        assert clock["interval"] == pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half])
        assert clock["text"] in " ".join(s["summary"]) and "side by side, 2 at a time" in clock["text"]
    # a run that trained part of its time with the other core idle (the queue's tail) is named beside the clock
    for r in s["runs"]:
        assert 0.0 <= r["short_handed_share"] <= 1.0
        assert (r["short_handed_share"] >= 0.05) == (f"{r['name']} {r['short_handed_share']:.0%}" in s["clock_context"])
    assert all(d > 0.1 for d in s["seeds"]["crippled"]["clock"]["equal_seconds_diff"])  # far behind on the clock
    assert "not every seed reached" in s["seeds"]["crippled"]["text"]


def test_the_loss_figures_are_labelled_by_their_axis_whatever_the_seeds(tmp_path):
    """Each loss plot's title and x axis name its axis (tokens, FLOPs, seconds), not the last run's legend label (the
    bug once seeds drew one line per recipe); the legend names each recipe with its seeds."""
    from moelab.analysis.studies.compare import RunCurves
    from moelab.analysis.studies.report import LOSS_AXES, loss_figure
    from moelab.run_config import load_config

    cfg = load_config("tiny-dense", TINY)

    def curves(name, shift):
        return RunCurves(name, cfg, [], tokens=[1.0, 2.0], flops=[10.0, 20.0], seconds=[0.5, 1.0],
                         val_loss=[5.0 + shift, 4.0 + shift])  # fmt: skip

    runs = [curves("tiny-dense-seed0", 0), curves("tiny-dense-seed1", 0.1), curves("tiny-moe-seed0", -0.1),
            curves("tiny-moe-seed1", -0.2)]  # fmt: skip
    expected = {"tokens": "training tokens", "flops": "training FLOPs", "seconds": "training seconds"}
    for axis, _ in LOSS_AXES:
        ax = loss_figure(runs, axis, dict(LOSS_AXES)[axis]).axes[0]
        assert ax.get_title() == f"validation loss vs {expected[axis]}", ax.get_title()
        assert ax.get_xlabel().startswith(expected[axis]) and ax.get_ylabel() == "validation loss (nats/token)"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tiny-dense (2 seeds)", "tiny-moe (2 seeds)"]


def test_the_recipes_a_verdict_pairs_train_beside_each_other(tmp_path, text_file, monkeypatch):
    """With --jobs, the seed-s runs of every recipe are queued together (not all seeds of one recipe first), so the
    runs the clock verdict pairs share the machine with each other rather than with their own other seeds."""
    from moelab.analysis.studies import compare as cmp
    from moelab.config import ConfigError

    queued = []

    def record(cmds, jobs):
        queued.extend(Path(cmd[cmd.index("--out") + 1]).name for _, cmd in cmds)
        raise ConfigError("stop before training")

    monkeypatch.setattr(cmp, "_run_all", record)
    with pytest.raises(ConfigError, match="stop before training"):
        cmp.compare(["tiny-dense", "tiny-moe"], out=tmp_path / "cmp", data=text_file, steps=2, seeds=3, jobs=2,
                    quiet=True)
    assert queued == [f"{r}-seed{s}" for s in range(3) for r in ("tiny-dense", "tiny-moe")]
    assert not (tmp_path / "cmp").exists()  # a refused compare leaves nothing behind


def test_the_next_training_starts_when_any_running_one_ends(tmp_path):
    """A short job queued behind a long one still gets the core the first short job freed: the third job starts
    (and ends) while the first, long one still runs."""
    from moelab.analysis.studies.compare import _run_all

    stamp = tmp_path / "order"
    py = sys.executable

    def job(name, wait_for=None):
        # the long job waits (bounded) for the file the third job writes, so the test cannot hang
        body = (f"import pathlib,time\np=pathlib.Path({str(stamp)!r})\n"
                + (f"t=time.time()\nwhile not pathlib.Path({str(wait_for)!r}).exists() and time.time()-t<60:"
                   " time.sleep(0.05)\n" if wait_for else "")
                + f"open(p,'a').write({name!r}+'\\n')\n"
                + (f"pathlib.Path({str(tmp_path / name)!r}).touch()\n"))
        return (name, [py, "-c", body])

    spans = _run_all([job("long", wait_for=tmp_path / "third"), job("short"), job("third")], jobs=2)
    assert stamp.read_text().split() == ["short", "third", "long"]
    (long_start, long_end), (short_start, short_end), (third_start, third_end) = spans
    assert long_start <= short_start < short_end <= third_start < third_end and third_start < long_end


def test_short_handed_share_counts_the_time_a_run_had_fewer_neighbours_than_jobs():
    from moelab.analysis.studies.compare import short_handed

    # two at a time: A 0-10, B 0-4, C 4-8; A alone from 8 to 10 (2 of its 10 s), B and C never alone
    assert short_handed([(0, 10), (0, 4), (4, 8)], jobs=2) == pytest.approx([0.2, 0.0, 0.0])
    # B ends at 3, C starts at 4: A alone for the gap's second (1 of 10), C alone after A ends at 10 (2 of 8)
    assert short_handed([(0, 10), (0, 3), (4, 12)], jobs=2) == pytest.approx([0.1, 0.0, 2 / 8])
    assert short_handed([(0, 5), (0, 5)], jobs=3) == [1.0, 1.0]  # fewer runs than jobs: never a full house


def test_a_recipe_given_overrides_of_its_own_runs_under_a_name_that_says_them(tmp_path, text_file, monkeypatch):
    """RECIPE+KEY=VALUE: the recipe trained with its own overrides after the shared --set ones (so they win), in a
    run named after them; a '+' inside a value (1e+3) stays in the value; a bad key is refused before any training."""
    from moelab.analysis.studies import compare as cmp
    from moelab.config import ConfigError
    from moelab.run_config import load_config

    queued = []

    def record(cmds, jobs):
        queued.extend([str(a) for a in cmd] for _, cmd in cmds)
        raise ConfigError("stop before training")

    monkeypatch.setattr(cmp, "_run_all", record)
    own = "tiny-moe+optim.muon_experts=dion+optim.lr=1e+3"
    with pytest.raises(ConfigError, match="stop before training"):
        cmp.compare(["tiny-moe", own], out=tmp_path / "cmp", data=text_file, steps=2, overrides=["optim.lr=0.002"],
                    quiet=True)
    (default, mine) = queued
    assert Path(default[default.index("--out") + 1]).name == "tiny-moe"
    assert Path(mine[mine.index("--out") + 1]).name == own
    for cmd, lr, experts in ((default, 0.002, "per_expert"), (mine, 1000.0, "dion")):
        recipe = cmd[cmd.index("train") + 1]
        cfg = load_config(recipe, [a for a in cmd if re.match(r"[a-z_][\w.]*=", a)])  # the overrides, in order
        assert (recipe, cfg.optim.lr, cfg.optim.muon_experts) == ("tiny-moe", lr, experts)
    with pytest.raises(ConfigError, match="optim.bogus"):
        cmp.compare(["tiny-moe", "tiny-moe+optim.bogus=1"], out=tmp_path / "bad", data=text_file, steps=2)
    assert len(queued) == 2 and not (tmp_path / "bad").exists()
