"""Nothing lost, nothing silent (docs/reliability.md): non-finite steps never reach a
checkpoint, commands never overwrite by accident, damaged checkpoints are named, and
bad input is one clear line. In-process `moelab.cli.main` calls keep this file fast."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, TINY_MOE
from moelab.cli import main
from moelab.errors import NonFiniteError
from moelab.run_config import load_config
from moelab.store.checkpoint import latest_checkpoint
from moelab.train import train
from moelab.store.checkpoint import FILES, STATE_FILE, check_checkpoint, save_checkpoint


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and one line, no traceback."""
    capsys.readouterr()
    assert main([*args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("moelab "), err
    return err[-1]


def tiny_cfg(data, steps, extra=()):
    cfg = load_config("tiny-moe", [*TINY_MOE, "train.log_every=1", *extra])
    cfg.data.source, cfg.train.steps = str(data), steps
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}.\n"
                         for i in range(1200)))
    return p


@pytest.fixture(scope="module")
def run4(tmp_path_factory, corpus):
    """A finished 4-step tiny-moe run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("run4") / "run"
    train(tiny_cfg(corpus, 4, ["train.ckpt_every=2"]), run, quiet=True)
    return run


def poison_grads_at(steps: set[int]):
    """prepare_model hook: the gradient of the embedding becomes NaN on the given steps
    (counted in backward passes), while the loss stays finite."""
    calls = {"n": 0}

    def prepare(model):
        def hook(g):
            calls["n"] += 1
            return g * float("nan") if calls["n"] in steps else g
        model.embed.weight.register_hook(hook)
    return prepare


# ------------------------------------------------------------ non-finite steps
def test_nan_gradient_stops_before_the_update_and_names_the_last_good_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"gradient norm is nan at step 4: stopping before the update; "
                                             r"the last good checkpoint is .*step-000002"):
        train(tiny_cfg(corpus, 10, ["train.ckpt_every=2"]), run, quiet=True, prepare_model=poison_grads_at({4}))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000002"]  # step 4 was never saved (it would have held NaN weights)
    weights = load_file(str(run / "checkpoints/step-000002/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nan_before_any_checkpoint_says_so(tmp_path, corpus):
    with pytest.raises(NonFiniteError, match="gradient norm is nan at step 2.*no checkpoint has been written yet"):
        train(tiny_cfg(corpus, 10, ["train.ckpt_every=3"]), tmp_path / "run", quiet=True,
              prepare_model=poison_grads_at({2}))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_skip_mode_skips_the_update_and_records_it(tmp_path, corpus):
    run = tmp_path / "run"
    res = train(tiny_cfg(corpus, 6, ["train.on_nonfinite=skip", "train.ckpt_every=1", "train.keep_checkpoints=10"]),
                run, quiet=True, prepare_model=poison_grads_at({3}))
    assert res.step == 6 and res.skipped_steps == 1
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[2]["skipped_steps"] == 1 and "step 3 skipped" in recs[2]["warnings"][0]
    assert recs[2]["grad_norm"] == "nan" and recs[1]["skipped_steps"] == 0

    def state(step, name):
        return load_file(str(run / "checkpoints" / f"step-{step:06d}" / name))

    # the reference is the run itself one step earlier: the skipped step changed no weight
    # and no optimizer moment or step count, bit for bit; the steps around it did update
    for name in ("model.safetensors", "optimizer.safetensors"):
        s2, s3, s4 = state(2, name), state(3, name), state(4, name)
        assert s2.keys() == s3.keys() == s4.keys()
        assert all(torch.equal(s2[k], s3[k]) for k in s2), name
        assert any(not torch.equal(s3[k], s4[k]) for k in s3), name
    assert all(torch.isfinite(v).all() for v in state(6, "model.safetensors").values())


def test_skip_mode_stops_after_too_many_in_a_row(tmp_path, corpus):
    with pytest.raises(NonFiniteError, match="at step 4, 2 steps in a row"):
        train(tiny_cfg(corpus, 10, ["train.on_nonfinite=skip", "train.max_skipped_steps=2"]), tmp_path / "run",
              quiet=True, prepare_model=poison_grads_at(set(range(3, 20))))


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="model.safetensors: non-finite values in \\['weight'\\]"):
        save_checkpoint(tmp_path, 1, model, None, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ resume must match
def test_resume_refuses_a_different_config_and_names_the_keys(tmp_path, corpus, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "tiny-moe", "--data", str(corpus), "--out", run, "--steps", "4", "--stop-after", "2",
                 "--quiet", *TINY_MOE]) == 0
    msg = cli_error(capsys, "train", "tiny-moe", "--out", run, "--steps", "4", "--resume", *TINY_MOE,
                    "model.moe.n_experts=8")
    assert "model.moe.n_experts: run has 4, command has 8" in msg
    msg = cli_error(capsys, "train", "tiny-dense", "--data", "/nonexistent", "--out", run, "--resume", *TINY)
    assert "data.source: run has" in msg and "model.moe" in msg
    # the horizon and logging settings may change; the data source defaults to the run's own
    assert main(["train", "tiny-moe", "--out", run, "--steps", "6", "--resume", "--quiet", *TINY_MOE,
                 "train.eval_every=3"]) == 0
    assert check_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["step"] == 6


def test_torn_metrics_line_does_not_stop_resume(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_cfg(corpus, 6), run, stop_after=4, quiet=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # killed mid-line
    res = train(tiny_cfg(corpus, 6), run, resume=True, quiet=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert res.step == 6 and steps == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------ damaged checkpoints
def test_damaged_latest_checkpoint_is_named_and_skipped(tmp_path, run4, corpus, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    data = run / "checkpoints/step-000004/model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF  # same size, different content: only the checksum can tell
    data.write_bytes(bytes(raw))
    assert main(["eval", str(run), "--data", str(corpus), "--split", "all", "--json"]) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step-000004" in err and "corrupted" in err
    assert "using " in err and "step-000002" in err
    assert latest_checkpoint(run / "checkpoints").name == "step-000002"  # resume sees the same


def test_truncated_latest_checkpoint_is_named(tmp_path, run4, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    opt = run / "checkpoints/step-000004/optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    latest = latest_checkpoint(run / "checkpoints")
    assert latest.name == "step-000002" and "optimizer.safetensors is truncated" in capsys.readouterr().err


def test_eval_refuses_non_finite_weights(tmp_path, run4, corpus, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    ckpt = run / "checkpoints/step-000004"
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["norm.weight"][0] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"))
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["files"] = {f: state["files"][f]["bytes"] for f in FILES}  # an older manifest: sizes only
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    msg = cli_error(capsys, "eval", str(ckpt), "--data", str(corpus), "--json")
    assert "non-finite values" in msg and "norm.weight" in msg


# ------------------------------------------------------------ outputs never overwritten
def test_folder_writing_commands_refuse_existing_output(tmp_path, run4, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(run4), "--out", str(hf)]) == 0
    before = sorted(p.name for p in hf.iterdir())
    assert "already exists and is not empty" in cli_error(capsys, "export", str(run4), "--out", str(hf))
    assert "already exists and is not empty" in cli_error(capsys, "import", str(hf), "--out", str(run4))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for args in (["import", str(hf), "--out", str(victim)],
                 ["upcycle", str(run4), "--experts", "2", "--top-k", "1", "--out", str(victim)]):
        assert "--overwrite" in cli_error(capsys, *args)
        assert (victim / "keep.txt").read_text() == "precious"
    # into (or over) its own input: refused even with --overwrite
    assert "would overwrite or nest inside the input" in cli_error(capsys, "export", str(run4), "--out",
                                                                   str(run4 / "hf"), "--overwrite")
    assert "would overwrite or nest inside" in cli_error(capsys, "import", str(hf), "--out", str(hf), "--overwrite")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in cli_error(capsys, "export", str(run4), "--out", str(afile))
    # --overwrite replaces the folder whole: no stale file of the old one survives
    (hf / "stale.safetensors").write_text("old shard")
    assert main(["export", str(run4), "--out", str(hf), "--overwrite"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == before
    # --overwrite replaces only an earlier output of the same kind: not a folder of one's own files, not a run with
    # a Hugging Face folder or a report
    assert "holds files moelab did not write" in cli_error(capsys, "import", str(hf), "--out", str(victim),
                                                           "--overwrite")  # fmt: skip
    assert (victim / "keep.txt").read_text() == "precious"
    shutil.copytree(run4, tmp_path / "r2")
    assert "holds a run folder" in cli_error(capsys, "export", str(run4), "--out", str(tmp_path / "r2"), "--overwrite")
    shutil.copytree(hf, tmp_path / "h2")
    assert "holds a Hugging Face folder" in cli_error(capsys, "import", str(hf), "--out", str(tmp_path / "h2"),
                                                      "--overwrite")  # fmt: skip
    assert (tmp_path / "r2" / "config.yaml").is_file() and (tmp_path / "h2" / "config.json").is_file()
    # the case that lost a run: a compare report over a training run, and a training over a report
    assert "holds a run folder" in cli_error(capsys, "compare", "tiny-dense", "tiny-moe", "--out", str(tmp_path / "r2"),
                                             "--overwrite")  # fmt: skip
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "summary.json").write_text("{}")
    assert "holds a compare report" in cli_error(capsys, "train", "tiny-moe", "--out", str(tmp_path / "rep"),
                                                 "--overwrite", *TINY_MOE)  # fmt: skip
    assert latest_checkpoint(tmp_path / "r2" / "checkpoints").name == "step-000004"
    assert main(["import", str(hf), "--out", str(tmp_path / "imp")]) == 0
    assert main(["import", str(hf), "--out", str(tmp_path / "imp"), "--overwrite"]) == 0  # an earlier import: replaced
    assert not list(tmp_path.glob(".*tmp-*"))


def test_failed_commands_leave_no_half_made_folder(tmp_path, run4, capsys):
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    (bad_hf / "config.json").write_text("{not json")
    assert "not valid JSON" in cli_error(capsys, "import", str(bad_hf), "--out", str(tmp_path / "imp"))
    assert not (tmp_path / "imp").exists()
    out = tmp_path / "r"
    cli_error(capsys, "train", "tiny-moe", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *TINY_MOE)
    assert not out.exists()
    # --overwrite of a good run with a start that fails leaves the good run in place
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    cli_error(capsys, "train", "tiny-moe", "--data", str(tmp_path / "missing.txt"), "--out", str(run),
              "--overwrite", *TINY_MOE)
    assert latest_checkpoint(run / "checkpoints").name == "step-000004"


def test_import_without_lm_head_for_untied_model_fails(tmp_path, run4, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(run4), "--out", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    msg = cli_error(capsys, "import", str(hf), "--out", str(tmp_path / "imp"))
    assert "lm_head.weight is missing" in msg


def test_init_uses_the_source_runs_tokenizer(tmp_path, run4):
    other = tmp_path / "other.txt"
    other.write_text("".join(f"completely different words {i} zebra quartz\n" for i in range(1500)))
    res = train(tiny_cfg(other, 2), tmp_path / "ft", init=str(run4), quiet=True)
    assert res.step == 2
    assert (tmp_path / "ft/tokenizer.json").read_text() == (run4 / "tokenizer.json").read_text()


# ------------------------------------------------------------ one clear line, not a traceback
def test_bad_input_is_one_clear_line(tmp_path, run4, corpus, capsys):
    out = str(tmp_path / "r")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00\x01garbage\n')
    assert "b.jsonl:2: not UTF-8" in cli_error(capsys, "train", "tiny-moe", "--data", str(binary), "--out", out)
    fake = tmp_path / "f.parquet"
    fake.write_text("not parquet at all")
    assert "not a readable parquet file" in cli_error(capsys, "train", "tiny-moe", "--data", str(fake), "--out", out)
    import pyarrow as pa
    import pyarrow.parquet as pq
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), ints)
    assert "column 'text' holds int64, expected strings" in cli_error(capsys, "train", "tiny-moe", "--data",
                                                                      str(ints), "--out", out)
    assert "train.device: expected auto, cpu, cuda" in cli_error(capsys, "train", "tiny-moe", "--out", out,
                                                                 "train.device=gpu0")
    # a device this machine lacks: CUDA here, on a CUDA machine one index past its last device
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    expected = "CUDA is not available" if not torch.cuda.is_available() else "CUDA device(s) here"
    assert expected in cli_error(capsys, "train", "tiny-moe", "--data", str(corpus), "--out", out,
                                 f"train.device={missing}", *TINY_MOE)
    assert "train.threads: expected a positive integer" in cli_error(capsys, "train", "tiny-moe", "--out", out,
                                                                     "train.threads=-1")
    assert "--stop-after: expected a positive" in cli_error(capsys, "train", "tiny-moe", "--out", out,
                                                            "--stop-after", "-3")
    assert "--top-k: expected 0" in cli_error(capsys, "generate", str(run4), "--prompt", "x", "--top-k", "-3")
    assert "--max-new-tokens: expected a positive" in cli_error(capsys, "generate", str(run4), "--prompt", "x",
                                                                "--max-new-tokens", "-5")
    assert "--devices: expected a positive" in cli_error(capsys, "memory", "tiny-moe", "--devices", "0", "--zero", "1")
    assert "--devices: expected a positive" in cli_error(capsys, "memory", "tiny-moe", "--devices", "-2")
    assert "--micro-batch: expected a positive" in cli_error(capsys, "memory", "tiny-moe", "--micro-batch", "0")
    hf = tmp_path / "hf"
    assert main(["export", str(run4), "--out", str(hf)]) == 0
    assert "run `moelab import" in cli_error(capsys, "eval", str(hf), "--data", str(corpus))
    # a checkpoint of another shape: named keys and shapes, not a load_state_dict traceback
    msg = cli_error(capsys, "train", "tiny-moe", "--data", str(corpus), "--out", out, "--init",
                    str(run4), *TINY_MOE, "model.d_ff=96", "model.moe.d_expert=24")
    assert "shapes differ" in msg and "w_gate (4, 16, 32) vs model (4, 24, 32)" in msg
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------ every command, the same guarantees
def test_distill_resume_refuses_other_settings(tmp_path, run4, corpus, capsys):
    out = tmp_path / "student"
    args = ["distill", str(run4), "--student", "tiny-dense", "--data", str(corpus), "--out", str(out), "--quiet",
            *TINY]
    assert main([*args, "--steps", "2"]) == 0
    assert json.loads((out / "distill.json").read_text())["temperature"] == 2.0
    msg = cli_error(capsys, *args, "--steps", "3", "--resume", "--temperature", "3", "--alpha", "0.2")
    assert "temperature: run has 2.0, command has 3.0" in msg and "alpha: run has 0.5, command has 0.2" in msg
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    assert main([*args, "--steps", "3", "--resume"]) == 0  # the same settings continue
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"


def test_tokenize_leaves_nothing_when_it_fails_and_says_what_a_folder_holds(tmp_path, run4, corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ds = tmp_path / "ds"
    assert "contains no text" in cli_error(capsys, "tokenize", str(empty), "--out", str(ds), "--vocab-size", "300")
    assert not ds.exists()
    assert main(["tokenize", str(corpus), "--out", str(ds), "--vocab-size", "300", "--quiet"]) == 0
    assert (ds / "manifest.json").is_file()
    msg = cli_error(capsys, "tokenize", str(corpus), "--out", str(run4), "--vocab-size", "300")
    assert "holds files that are not a dataset" in msg


def test_values_out_of_range_are_one_line_and_leave_no_folder(tmp_path, run4, corpus, capsys):
    out = tmp_path / "r"
    for override, expected in [("model.moe.capacity_factor=inf", "model.moe.capacity_factor: expected a finite"),
                               ("optim.lr=nan", "optim.lr: expected a finite number"),
                               ("optim.beta1=1.5", "optim.beta1: expected 0 <= beta1 < 1"),
                               ("train.seed=-1", "train.seed: expected an integer in 0..2**32-1")]:
        assert expected in cli_error(capsys, "train", "tiny-moe", "--data", str(corpus), "--out", str(out),
                                     *TINY_MOE, override)
        assert not out.exists()
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) + "\n" for i in range(20)))
    assert "--steps: expected a positive" in cli_error(capsys, "finetune", str(run4), "--data", str(sft), "--out",
                                                       str(out), "--recipe", "full", "--steps", "0")
    assert "--tokens: expected a positive" in cli_error(capsys, "compare", "tiny-dense", "tiny-moe", "--out",
                                                        str(out), "--tokens", "0")
    assert "--seq-len: expected at most model.max_seq_len=" in cli_error(capsys, "memory", "tiny-moe", "--seq-len",
                                                                         "100000")
    assert "--temperature: expected a positive" in cli_error(capsys, "distill", str(run4), "--student", "tiny-dense",
                                                             "--data", str(corpus), "--out", str(out),
                                                             "--temperature", "nan")
    assert "--lrs: expected a comma-separated list of positive" in cli_error(
        capsys, "lr-sweep", "--recipe", "tiny-moe", "--sizes", "32", "--lrs", "0,-1", "--out", str(out))
    # a compare whose training fails (here: a device this machine lacks) leaves no report folder behind
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert "training tiny-dense failed" in cli_error(capsys, "compare", "tiny-dense", "--data", str(corpus),
                                                     "--out", str(out), "--steps", "1", "--set",
                                                     f"train.device={missing}")
    assert not out.exists() and not list(tmp_path.glob(".r.*"))


def test_export_of_a_quantized_run_writes_its_dequantized_weights(tmp_path, run4, capsys):
    import transformers

    from moelab.store.run import load_run

    q = tmp_path / "q"
    assert main(["quantize", str(run4), "--bits", "4", "--group-size", "16", "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["export", str(q), "--out", str(tmp_path / "hf")]) == 0
    assert "exporting them dequantized" in capsys.readouterr().err
    ours = load_run(q, device="cpu").model  # computes with the 4-bit weights
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        got, want = theirs(x).logits, ours(x).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        plain = load_run(run4, device="cpu").model(x).logits
    # the 4-bit values, not the original weights: far nearer the quantized model than the plain one
    assert (got - plain).abs().max() > 10 * (got - want).abs().max()


def test_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "moelab", "memory", "tiny-moe", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before a byte is written, as `| head -c 0` would be
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err, err


def test_eval_and_generate_take_a_thread_count_and_auto_leaves_busy_cores_alone(run4, corpus, capsys, monkeypatch):
    from moelab import runtime

    try:
        assert main(["generate", str(run4), "--prompt", "the", "--max-new-tokens", "2", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["eval", str(run4), "--data", str(corpus), "--max-tokens", "64", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert "--threads: expected a positive" in cli_error(capsys, "eval", str(run4), "--data", str(corpus),
                                                             "--threads", "0")
        monkeypatch.setattr(runtime, "DEFAULT_THREADS", 4)
        for idle, expected in [(1.2, 1), (2.6, 3), (3.7, 4), (9.0, 4), (0.1, 1), (None, 4)]:
            monkeypatch.setattr(runtime, "idle_cores", lambda window_s=0.2, v=idle: v)
            assert runtime.set_cpu_threads(None) == expected == torch.get_num_threads(), idle
        # a pinned count above the idle cores is kept (it was asked for) but said, once, with what to do
        capsys.readouterr()
        for idle, warned in [(1.0, True), (2.0, False), (None, False)]:
            monkeypatch.setattr(runtime, "idle_cores", lambda window_s=0.2, v=idle: v)
            assert runtime.set_cpu_threads(2) == 2 == torch.get_num_threads()
            err = capsys.readouterr().err
            assert ("warning: train.threads=2 but about 1 of the cores is idle now" in err) == warned, (idle, err)
            assert err.count("\n") == (1 if warned else 0)
    finally:
        torch.set_num_threads(1)


def test_flags_that_would_do_nothing_are_refused_and_a_default_that_cannot_fit_is_not_taken(tmp_path, run4, corpus,
                                                                                         capsys):
    """Settings accepted before and then ignored without a word: each is one line now, and no folder is left."""
    out = str(tmp_path / "r")
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 96\n")
    assert "'d_model' is given twice (lines 2 and 4): keep one" in cli_error(capsys, "train", str(twice), "--out", out)
    assert "optim.expert_lr_mult=2.0: the model has no routed experts" in cli_error(
        capsys, "train", "tiny-dense", "--out", out, "optim.expert_lr_mult=2")
    assert "optim.muon_experts=adamw: the model has no routed experts" in cli_error(
        capsys, "train", "tiny-dense", "--out", out, "optim.muon_experts=adamw")
    for flags, said in ((["--pipeline", "0"], "--pipeline: expected a positive number, got 0"),
                        (["--pipeline", "-1"], "--pipeline: expected a positive number, got -1"),
                        (["--virtual-stages", "0"], "--virtual-stages: expected a positive number, got 0"),
                        (["--virtual-stages", "2"], "--virtual-stages: expected 1 without --pipeline, got 2")):
        assert said in cli_error(capsys, "memory", "tiny-moe", *flags)
    for flags in (["--seeds", "2"], ["--steps", "50"], ["--jobs", "2"]):  # finished runs are read, not trained
        msg = cli_error(capsys, "compare", str(run4), str(run4), "--out", out, *flags)
        assert f"{flags[0]}: every item is a finished run" in msg
    assert not (tmp_path / "r").exists()
    # quantize's default group size on a model 32 wide with experts 16 wide (w_down's input): 64 fits neither, 16
    # divides both, said in its line
    assert main(["quantize", str(run4), "--bits", "4", "--out", str(tmp_path / "q")]) == 0
    assert "(groups of 16)" in capsys.readouterr().out
    assert "--group-size: 64 does not divide the input size 32" in cli_error(
        capsys, "quantize", str(run4), "--bits", "4", "--out", str(tmp_path / "q2"), "--group-size", "64")


def test_a_resume_that_would_train_nothing_says_so_and_absurd_sizes_are_refused(tmp_path, run4, corpus, capsys):
    run = tmp_path / "run"
    shutil.copytree(run4, run)  # a finished 4-step run
    args = ["train", "tiny-moe", "--data", str(corpus), "--out", str(run), "--resume", "--quiet", *TINY_MOE,
            "train.log_every=1", "train.ckpt_every=2"]  # fmt: skip
    msg = cli_error(capsys, *args, "--steps", "2")
    assert "train.steps=2 (--steps): the run is already at step 4" in msg and "not steps to add" in msg
    before = (run / "metrics.jsonl").read_text()
    assert main([*args, "--steps", "4"]) == 0
    assert "nothing to train: the run already ended at step 4" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    assert "train.batch_size: expected at most 65,536 sequences" in cli_error(
        capsys, "train", "tiny-moe", "--data", str(corpus), "--out", str(tmp_path / "b"), "train.batch_size=1000000000")
    one = tmp_path / "one.txt"
    one.write_text("a single short document\n")
    msg = cli_error(capsys, "tokenize", str(one), "--out", str(tmp_path / "ds"), "--vocab-size", "300")
    assert "has 1 document; at least 2 are needed" in msg
    assert not (tmp_path / "ds").exists() and not (tmp_path / "b").exists()  # a failed fresh output leaves nothing


def test_a_run_that_diverged_before_its_first_checkpoint_says_how_to_start_again(tmp_path, corpus, capsys):
    """Its folder stays (the metrics are the diagnosis), so a rerun and --resume both stop - each now says the one
    thing that works, --overwrite, instead of pointing at the other."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="start again with --overwrite"):
        train(tiny_cfg(corpus, 4, ["train.ckpt_every=4"]), run, quiet=True, prepare_model=poison_grads_at({1}))
    assert (run / "metrics.jsonl").exists() and not list((run / "checkpoints").glob("step-*"))
    args = ["train", "tiny-moe", "--data", str(corpus), "--out", str(run), "--steps", "4", "--quiet", *TINY_MOE]
    msg = cli_error(capsys, *args)
    assert "holds no checkpoint to resume" in msg and "--overwrite" in msg and "--resume" not in msg
    msg = cli_error(capsys, *args, "--resume")
    assert "stopped before its first one" in msg and "start it again with --overwrite" in msg
    assert main([*args, "--overwrite"]) == 0


def test_a_pipe_as_data_is_refused_by_name_before_it_is_read(tmp_path, capsys):
    """`--data <(cat f)` is a pipe: read once for the tokenizer it would leave nothing for the tokens ("no text")."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nothing writes to it: opening it would block, so a refusal proves it was not opened
    for args in (["tokenize", str(fifo), "--out", str(tmp_path / "ds"), "--vocab-size", "300", "--quiet"],
                 ["train", "tiny-moe", "--data", str(fifo), "--out", str(tmp_path / "run"), "--quiet", *TINY_MOE]):
        msg = cli_error(capsys, *args)
        assert "is a pipe or device" in msg and "save it to a file first" in msg, msg
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()


def test_a_model_that_cannot_fit_is_one_line_before_any_allocation(tmp_path, capsys):
    """Without the check, an absurd width dies in the allocator or is killed by the kernel (seen: SIGKILL)."""
    msg = cli_error(capsys, "train", "tiny-moe", "--out", str(tmp_path / "run"), "--quiet", *TINY_MOE,
                    "model.d_model=131072")  # fmt: skip
    assert "needs at least" in msg and "GiB available" in msg and "model.d_model" in msg, msg
    assert not (tmp_path / "run").exists()
