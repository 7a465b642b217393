"""`moelab compare`: interpolation on synthetic curves and the report end to end."""
import json

import pytest

from conftest import TINY, run_cli
from moelab.analysis.studies.compare import x_to_reach, y_at


def test_interpolation_on_synthetic_curves():
    xs = [100.0, 200.0, 300.0, 400.0]
    ys = [5.0, 4.0, 3.0, 2.5]
    assert x_to_reach(xs, ys, 3.5) == pytest.approx(250.0)
    assert x_to_reach(xs, ys, 2.75) == pytest.approx(350.0)
    assert x_to_reach(xs, ys, 6.0) == 100.0
    assert x_to_reach(xs, ys, 2.0) is None
    assert y_at(xs, ys, 150.0) == pytest.approx(4.5)
    assert y_at(xs, ys, 500.0) is None


def test_compare_end_to_end(tmp_path, text_file):
    out = tmp_path / "cmp"
    sets = [a for o in TINY + ["train.eval_every=2"] for a in ("--set", o)]
    _, stdout, _ = run_cli("compare", "tiny-dense", "tiny-moe", "--data", str(text_file), "--out", str(out),
                           "--steps", "8", "--quiet", *sets)
    assert "report.html" in stdout
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5  # 3 loss plots + heatmap + router health
    assert "<img" in page and 'src="http' not in page  # self-contained
    s = json.loads((out / "summary.json").read_text())
    assert s["reference"] == "tiny-dense" and [r["name"] for r in s["runs"]] == ["tiny-dense", "tiny-moe"]
    for r in s["runs"]:
        assert {"name", "final_val_loss", "tokens_per_s", "peak_mem_bytes", "params_total", "params_active"} <= set(r)
    # The speed-up is recomputed here from the raw metrics.jsonl files, by hand: the tokens
    # at which the MoE's validation curve first reaches the dense model's final loss.
    def curve(name):
        recs = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    dense, moe = curve("tiny-dense"), curve("tiny-moe")
    target, need = dense[-1][1], None
    for (t0, l0), (t1, l1) in zip([(0, float("inf"))] + moe, moe):
        if l1 <= target:
            need = t1 if l0 == float("inf") else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
            break
    sp = s["speedup"]["tiny-moe"]
    assert sp["tokens_needed"] == (pytest.approx(need) if need is not None else None)
    if need:
        assert sp["tokens_speedup"] == pytest.approx(dense[-1][0] / need)
    assert s["summary"] and "tiny-moe holds" in s["summary"][0]
    # on the clock, recomputed by hand from the same files: each run's loss where the shorter run's training seconds
    # end, and the MoE's training seconds to the dense model's final loss over the dense run's
    def timed(name):
        recs = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["elapsed_s"], r["val_loss"]) for r in recs if "val_loss" in r]

    def at(points, x):
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= x <= x1:
                return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
        return points[0][1] if x == points[0][0] else None

    d_t, m_t = timed("tiny-dense"), timed("tiny-moe")
    t_equal = min(d_t[-1][0], m_t[-1][0])
    assert sp["equal_seconds"] == pytest.approx(t_equal)
    assert sp["val_loss_at_equal_seconds"] == pytest.approx(at(m_t, t_equal))
    assert sp["ref_val_loss_at_equal_seconds"] == pytest.approx(at(d_t, t_equal))
    if need:
        s_need = next(x0 + (l0 - target) / (l0 - l1) * (x1 - x0) if i else x1
                      for i, ((x0, l0), (x1, l1)) in enumerate(zip([(0, float("inf"))] + m_t, m_t)) if l1 <= target)
        assert sp["seconds_ratio"] == pytest.approx(s_need / d_t[-1][0])
    first = s["summary"][0]
    assert first.startswith("tiny-moe vs tiny-dense, held-out loss at equal tokens")
    assert "at equal seconds" in first and "trained here one after another" in first and s["clock_context"] in first
    # where the time goes: a short profile of each run's last checkpoint
    assert "Where the time goes" in page
    # a percentage where the 3 timing rounds agree; where they do not (tiny models, a busy host), it says so instead
    assert ("Profiled, its step took" in s["summary"][0]) != ("cannot be told apart here" in s["summary"][0])
    dense_t, moe_t = (r["time_ms"] for r in s["runs"])
    assert "ffn" in dense_t and not {"router", "experts", "combine"} & set(dense_t)
    assert {"router", "experts", "combine"} <= set(moe_t) and "ffn" not in moe_t
    for r in s["runs"]:
        assert sum(r["time_ms"].values()) == pytest.approx(r["step_ms"], rel=1e-6)
    assert "routing imbalance costs" in s["runs"][1]["imbalance"]["text"] and "imbalance" not in s["runs"][0]
    # serving: each run decoding with its KV cache, and the MoE's dense total twin (equal total parameters)
    inf = s["inference"]
    assert [r["name"] for r in inf["rows"]] == ["tiny-dense", "tiny-moe", "tiny-moe dense total twin"]
    dense_r, moe_r, total_r = inf["rows"]
    assert total_r["params_total"] == moe_r["params_total"] - 2 * 8 * 32  # all but the routers (2 layers, 8 x 32)
    assert total_r["params_active"] == total_r["params_total"] and moe_r["params_active"] < moe_r["params_total"]
    assert inf["context"] == 32 and all(r["decode_tokens_per_s"]["1"] > 0 for r in inf["rows"])
    assert "tiny-moe decodes" in inf["text"][0] and "x tiny-dense's" in inf["text"][0]
    assert "<h2>Inference</h2>" in page and "tiny-moe dense total twin" in page

    # Finished run folders can be compared again without training.
    _, stdout, _ = run_cli("compare", str(out / "runs" / "tiny-dense"), str(out / "runs" / "tiny-moe"),
                           "--out", str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["speedup"]["tiny-moe"] == pytest.approx(sp)


def test_measured_training_memory_shows_the_experts(tmp_path, text_file):
    """The demo's setting (full tiny recipes, 16 x 128 tokens): the measured training
    memory of tiny-moe exceeds tiny-dense's by at least half of what its extra weights,
    gradients and AdamW state need (2.16x the parameters), each run in its own process."""
    from moelab.analysis.memory.plan import plan_memory
    from moelab.analysis.memory.setup import MemorySetup
    from moelab.run_config import load_config

    measured, planned = {}, {}
    for recipe in ("tiny-dense", "tiny-moe"):
        run = tmp_path / recipe
        run_cli("train", recipe, "--data", str(text_file), "--out", str(run), "--steps", "3", "--quiet",
                "train.log_every=1", "train.threads=1")
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        measured[recipe] = max(r["train_mem_bytes"] for r in recs)
        cfg = load_config(recipe)
        p = plan_memory(cfg.model, MemorySetup(micro_batch=cfg.train.batch_size, seq_len=cfg.data.seq_len))
        planned[recipe] = p.bytes
    state = {r: planned[r]["params"] + planned[r]["grads"] + planned[r]["optimizer"] for r in planned}
    assert measured["tiny-moe"] - measured["tiny-dense"] > 0.5 * (state["tiny-moe"] - state["tiny-dense"]), measured
    for r in planned:  # and each is of the order the planner predicts (state + activations)
        assert 0.5 < measured[r] / (state[r] + planned[r]["activations"]) < 3, (r, measured[r], planned[r])


def test_a_compare_that_fails_after_training_keeps_its_runs_and_two_moes_compare(tmp_path, text_file, monkeypatch,
                                                                                 capsys):
    """The report failing after the training (here: its inference part) must not take the trained runs with the
    staging folder; the kept runs, compared again as finished runs, make a report with no dense item."""
    from moelab.analysis.studies import compare as cmp

    def broken(*args, **kwargs):
        raise RuntimeError("the inference table failed")

    monkeypatch.setattr(cmp, "bench_runs", broken)
    items = ["tiny-moe", "tiny-moe+optim.muon_experts=adamw"]
    out = tmp_path / "cmp"
    with pytest.raises(RuntimeError, match="the inference table failed"):
        cmp.compare(items, out=out, data=text_file, steps=4, overrides=TINY, quiet=True)
    kept = tmp_path / "cmp.runs"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cmp.runs", "corpus.txt"]
    assert sorted(p.name for p in kept.iterdir()) == sorted(items)
    for name in items:
        lines = (kept / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 4  # trained to the end, not a partial run
    assert str(kept) in capsys.readouterr().err
    monkeypatch.undo()

    s = cmp.compare([str(kept / n) for n in items], out=out, data=None)
    assert s["reference"] == "tiny-moe"
    inf = s["inference"]
    assert [r["name"] for r in inf["rows"]] == [*items, "tiny-moe dense total twin"]
    first, second = inf["text"]
    assert first.startswith("tiny-moe decodes") and "x tiny-moe dense total twin's" in first
    assert second.startswith(f"{items[1]} decodes") and "twin" not in second  # not the other MoE's twin
    # a second failure keeps its runs beside the first ones, never over them
    monkeypatch.setattr(cmp, "bench_runs", broken)
    with pytest.raises(RuntimeError):
        cmp.compare(["tiny-moe"], out=tmp_path / "cmp", data=text_file, steps=2, overrides=TINY, quiet=True,
                    overwrite=True)
    assert (tmp_path / "cmp.runs-1" / "tiny-moe").is_dir() and (kept / "tiny-moe" / "metrics.jsonl").is_file()
    assert (out / "summary.json").is_file()  # the earlier output stands
