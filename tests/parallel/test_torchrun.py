"""`torchrun --nproc_per_node 2 -m moelab train ...` end to end (gloo), the commands that
read its run folder, and layouts that cannot work: one clear line from every rank, no
hang (each launch has a timeout)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import TINY_MOE, namespaces_work, run_cli
from moelab.cli import main
from moelab.store.run import load_run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MOELAB_DIST_TIMEOUT_S="120")
    return subprocess.run([*TORCHRUN, "-m", "moelab", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_torchrun_trains_and_the_run_folder_is_usable(tmp_path, text_file):
    run = tmp_path / "run"
    parity = ["model.moe.jitter=0", "optim.eps=1e-6"]  # as tests/parallel/test_distributed_training.py says why
    r = torchrun("train", "tiny-moe", "--data", str(text_file), "--out", str(run), "--steps", "4", "--quiet",
                 *TINY_MOE, *parity, "train.log_every=1", "train.ckpt_every=2", "parallel.expert=2")
    assert r.returncode == 0, r.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one line per step: rank 0 alone writes
    assert r.stderr.count("finished at step 4") == 1
    assert (run / "checkpoints" / "step-000004" / "dcp" / ".metadata").is_file()

    # eval, generate and export read the distributed checkpoint (consolidated in memory)
    _, out, err = run_cli("eval", str(run), "--data", str(text_file), "--json")
    # the same 4 steps in one process: the torchrun run's held-out loss is that run's
    assert main(["train", "tiny-moe", "--data", str(text_file), "--out", str(tmp_path / "one"), "--steps", "4",
                 "--quiet", *TINY_MOE, *parity, "train.log_every=1", "train.ckpt_every=2"]) == 0
    from moelab.inference import evaluate_source

    one = evaluate_source(load_run(tmp_path / "one", device="cpu"), str(text_file))["loss"]
    assert json.loads(out)["loss"] == pytest.approx(one, abs=1e-4)
    assert "torch.distributed is disabled" not in err  # one process reading a DCP checkpoint is the intended path
    _, out, _ = run_cli("generate", str(run), "--prompt", "the quick", "--max-new-tokens", "5")
    assert out.strip()
    run_cli("export", str(run), "--out", str(tmp_path / "hf"))

    ours = load_run(run, device="cpu").model
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout,message", [
    (["parallel.expert=3"], "parallel.expert=3 does not divide model.moe.n_experts=4"),
    (["parallel.data_shard=2", "parallel.data_replicate=2"], "parallel.data_shard x parallel.data_replicate = 2 x 2"),
    (["parallel.pipeline=2"], "train.grad_accum=1 micro-batches cannot fill a pipeline of 2 stages"),
])
def test_bad_layout_is_one_line_on_every_rank(tmp_path, text_file, layout, message):
    r = torchrun("train", "tiny-moe", "--data", str(text_file), "--out", str(tmp_path / "run"), "--steps", "2",
                 *TINY_MOE, *layout, timeout=120)
    assert r.returncode == 1  # torchrun's own code for a failed worker; each worker exited 2
    assert_short_report(r, message)
    assert not (tmp_path / "run").exists()


def assert_short_report(r: subprocess.CompletedProcess, message: str) -> None:
    """torchrun's report of a failure moelab expected: every rank printed moelab's line and
    no traceback of its own, and the launcher's summary names that line for every rank."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("moelab train: error:")]
    # the whole stderr when a rank's line is missing: where it went (interleaved, never printed) is the question
    assert len(lines) == 2 and all(message in line for line in lines), r.stderr
    assert not any(line.startswith("[rank") for line in r.stderr.splitlines()), r.stderr[-3000:]
    summary = r.stderr.split("moelab FAILED", 1)[1]
    named = [line for line in summary.splitlines() if line.strip().startswith("traceback : moelab train: error:")]
    assert len(named) == 2 and all(message in line for line in named), summary
    assert "To enable traceback" not in r.stderr
    # what remains is torchrun's: three log lines, its ChildFailedError traceback and its summary
    assert len(r.stderr.splitlines()) <= 50, r.stderr


def test_a_failure_one_rank_finds_ends_every_rank_with_its_line(tmp_path):
    """Rank 0 prepares the data while rank 1 waits in a collective: a source with one
    document fails on rank 0 only. Rank 1 exits with rank 0's line, not with a traceback
    from the collective rank 0 left."""
    one = tmp_path / "one.txt"
    one.write_text("a single document of a few words, " * 40)
    r = torchrun("train", "tiny-moe", "--data", str(one), "--out", str(tmp_path / "run"), "--steps", "2",
                 *TINY_MOE, "parallel.expert=2", timeout=120)
    assert r.returncode == 1
    assert_short_report(r, "has 1 document")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_under_expert_parallelism_is_one_line(tmp_path, text_file):
    """EP=2 with --out on a file system that fills at the first checkpoint: DCP's nested
    per-rank tracebacks become the one line naming the full disk, on every rank."""
    if not namespaces_work():
        pytest.fail("a full disk needs `unshare -rm` (user namespaces) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    launch = " ".join([*TORCHRUN, "-m", "moelab", "train", "tiny-moe", "--data", str(text_file), "--out",
                       str(disk / "run"), "--steps", "4", "--quiet", *TINY_MOE, "train.ckpt_every=2",
                       "parallel.expert=2"])
    env = dict(os.environ, OMP_NUM_THREADS="1", MOELAB_DIST_TIMEOUT_S="120")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=400k tmpfs {disk} && {launch}"],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 1
    assert_short_report(r, "no space left on the device")


def test_parallel_layout_without_torchrun_says_how_to_launch(tmp_path, text_file):
    rc, _, err = run_cli("train", "tiny-moe", "--data", str(text_file), "--out", str(tmp_path / "run"),
                         *TINY_MOE, "parallel.expert=2", check=False)
    assert rc == 2 and "torchrun --nproc_per_node" in err


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (torchrun and its workers:
    the workers run in sessions of their own)."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_save_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path, text_file):
    """SIGKILL the whole torchrun job while a checkpoint's temporary folder exists: the
    newest complete checkpoint still verifies and loads, and one process resumes from it."""
    import time

    from moelab.store.checkpoint import check_checkpoint, latest_checkpoint, model_tensors

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MOELAB_DIST_TIMEOUT_S="120")
    cmd = [*TORCHRUN, "-m", "moelab", "train", "tiny-moe", "--data", str(text_file), "--out", str(run),
           "--steps", "400", "--quiet", *TINY_MOE, "train.ckpt_every=1", "train.keep_checkpoints=3",
           "parallel.expert=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, deadline, killed_mid_save = run / "checkpoints", time.time() + 180, False
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(ckpts.glob("step-*")) and any(ckpts.glob(".tmp-step-*")):
                kill_all(str(run))
                killed_mid_save = any(ckpts.glob(".tmp-step-*"))
                break
            time.sleep(0.001)
    finally:
        kill_all(str(run))
        proc.wait(timeout=30)
        time.sleep(0.5)  # let the kernel reap the workers before the folder is read
    assert killed_mid_save, "the job was not caught inside a save"
    last = latest_checkpoint(ckpts)
    assert last is not None
    check_checkpoint(last)  # every file present, every checksum right
    assert all(torch.isfinite(t).all() for t in model_tensors(last).values())
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    run_cli("train", "tiny-moe", "--data", str(text_file), "--out", str(run), "--resume", "--steps", str(step + 1),
            "--quiet", *TINY_MOE, "train.ckpt_every=1", "train.keep_checkpoints=3")
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def test_gpu_check_dry_run(tmp_path, text_file):
    """benchmarks/gpu_check.sh runs end to end here on CPU (--dry-run), so the one
    command meant for a lent GPU machine is known to work before that machine exists."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), DATA=str(text_file), PYTHON=sys.executable)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    r = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ep = (tmp_path / "out" / "ep.txt").read_text()
    assert "max |y_ep - y_one| 0," in ep and "DCP checkpoint written" in ep
    assert "tokens/s" in (tmp_path / "out" / "train.txt").read_text()
    profile = (tmp_path / "out" / "profile.txt").read_text()
    assert "routing imbalance costs" in profile and (tmp_path / "out" / "profile" / "trace.json").is_file()
    inference = (tmp_path / "out" / "inference.txt").read_text()
    assert "its dense twin's tokens/s" in inference and "dense total twin" in inference
    muon = (tmp_path / "out" / "muon.txt").read_text()
    assert all(f"| {way} |" in muon for way in ("jordan", "bf16-jordan", "dion-experts", "adamw-experts"))


def test_a_rank_with_its_failure_watcher_polling_exits_cleanly():
    """A finished rank's peer-failure watcher polls torchrun's agent store from a daemon thread; if that thread is
    inside the store's C++ call when the interpreter finalises, the rank aborts ('terminate called without an active
    exception') after a good run. Here the watcher polls without pause, so it is inside a call nearly always: the
    process must still exit 0 with nothing on stderr (without the join at exit it aborted in 6 runs of 6)."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    code = ("import time\nfrom moelab.parallel import failures\nfailures.WATCH_EVERY_S = 0.0\n"
            "failures.watch_for_peer_failures()\nassert failures._watching[0].is_alive()\ntime.sleep(0.3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode, r.stderr) == (0, "")
