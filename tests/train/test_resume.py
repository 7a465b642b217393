"""Exact resume, checkpoint atomicity under SIGKILL, and health stops."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MOE
from moelab.run_config import load_config
from moelab.store.checkpoint import latest_checkpoint
from moelab.train import NonFiniteLoss, train
from moelab.store.checkpoint import check_checkpoint


def cfg_for(data, steps, extra=()):
    cfg = load_config("tiny-moe", TINY_MOE + ["train.log_every=1", "model.moe.jitter=0.1",
                                              "model.moe.bias_update_rate=0.001", *extra])
    cfg.data.source, cfg.train.steps = str(data), steps
    return cfg


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_stop_and_resume_is_bitwise_identical(tmp_path, text_file):
    train(cfg_for(text_file, 8), tmp_path / "a", quiet=True)
    first = train(cfg_for(text_file, 8), tmp_path / "b", stop_after=4, quiet=True)
    assert first.stopped_early and first.step == 4
    train(cfg_for(text_file, 8), tmp_path / "b", resume=True, quiet=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))  # each step logged once, none lost or repeated
    for s in range(5, 9):
        assert a[s] == b[s], (s, a[s], b[s])  # bitwise: fp32 on CPU, same threads
    from safetensors.torch import load_file
    ma = load_file(str(latest_checkpoint(tmp_path / "a" / "checkpoints") / "model.safetensors"))
    mb = load_file(str(latest_checkpoint(tmp_path / "b" / "checkpoints") / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


KILL_SCRIPT = r"""
import sys, time, pathlib
import moelab.store.checkpoint as ck
from moelab.run_config import load_config
from moelab.train import train

real_save, calls = ck._save, {"n": 0}
def slow_save(tensors, path, **kw):
    real_save(tensors, path, **kw)
    if path.name == "optimizer.safetensors":
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint: signal the parent, then hang mid-write
            pathlib.Path(sys.argv[3]).write_text("writing")
            time.sleep(60)
ck._save = slow_save
cfg = load_config("tiny-moe", sys.argv[4:])
cfg.data.source = sys.argv[1]
cfg.train.steps = 12
train(cfg, sys.argv[2], quiet=True)
"""


def test_sigkill_during_checkpoint_write_then_resume(tmp_path, text_file):
    run, flag = tmp_path / "run", tmp_path / "flag"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(text_file), str(run), str(flag), *TINY_MOE],
                            env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = run / "checkpoints"
    assert any(p.name.startswith(".tmp-step-000008") for p in ckpts.iterdir())  # the half-written one
    assert latest_checkpoint(ckpts).name == "step-000004"
    cfg = load_config("tiny-moe", TINY_MOE)
    cfg.data.source, cfg.train.steps = str(text_file), 12
    res = train(cfg, run, resume=True, quiet=True)
    assert res.step == 12 and latest_checkpoint(ckpts).name == "step-000012"
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())
    assert sorted(losses(run)) == list(range(2, 13, 2))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, text_file, monkeypatch):
    from moelab.model import Transformer
    real_forward, calls = Transformer.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = real_forward(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6 and out.loss is not None:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 6: stopping before the update; the last good checkpoint is .*step-000004"):
        train(cfg_for(text_file, 10), tmp_path / "run", quiet=True)
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "step-000004" and check_checkpoint(last)["step"] == 4


def test_a_run_records_its_threads_and_a_rerun_or_resume_of_what_it_records_computes_the_same(tmp_path, text_file):
    """train.threads unset (auto: the idle cores at start) is recorded as the count in force - it sets the matmuls'
    summation order - so the recorded config rerun, and a --resume that does not name threads, train bitwise alike."""
    from moelab.run_config import load_config, read_config

    def cfg(recipe="tiny-moe"):
        c = load_config(recipe, [o for o in TINY_MOE if not o.startswith("train.threads")] + ["train.log_every=1"])
        c.data.source, c.train.steps = str(text_file), 6
        return c

    assert cfg().train.threads is None
    train(cfg(), tmp_path / "a", quiet=True)
    recorded = read_config(tmp_path / "a" / "config.yaml").train.threads
    assert isinstance(recorded, int) and recorded >= 1
    again = cfg(str(tmp_path / "a" / "config.yaml"))  # the run's own settings, as a recipe
    assert again.train.threads == recorded
    train(again, tmp_path / "b", quiet=True)
    train(cfg(), tmp_path / "c", stop_after=3, quiet=True)
    resumed = cfg()
    resumed.train.threads = None  # the command names no thread count: the run's recorded one is used
    train(resumed, tmp_path / "c", resume=True, quiet=True)
    assert read_config(tmp_path / "c" / "config.yaml").train.threads == recorded
    a, b, c = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    assert a == b == c, (a, b, c)


def test_a_relative_data_path_is_recorded_absolute_and_resume_works_from_another_folder(tmp_path, text_file,
                                                                                       monkeypatch, capsys):
    from conftest import run_main
    from moelab.run_config import read_config

    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work" / "corpus.txt").write_text(text_file.read_text())
    monkeypatch.chdir(tmp_path / "work")
    run_main(capsys, "train", "tiny-moe", "--data", "corpus.txt", "--out", "run", "--steps", "4", "--stop-after", "2",
             "--quiet", *TINY_MOE)  # fmt: skip
    recorded = read_config(tmp_path / "work" / "run" / "config.yaml").data.source
    assert recorded == str(tmp_path / "work" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "elsewhere")  # "corpus.txt" means nothing here: the recorded path still does
    run_main(capsys, "train", "tiny-moe", "--out", str(tmp_path / "work" / "run"), "--steps", "4", "--resume",
             "--quiet", *TINY_MOE)  # fmt: skip
    assert latest_checkpoint(tmp_path / "work" / "run" / "checkpoints").name == "step-000004"
