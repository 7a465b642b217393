import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

# Tests assert bitwise equality across processes; pin the thread count everywhere.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=2",
        "train.eval_every=4", "train.eval_batches=2", "train.ckpt_every=4", "optim.warmup_steps=2",
        "data.tokenizer_train_bytes=300000", "train.threads=1",
        # parity across layouts and accumulation holds to fp32's rounding (bf16 or `auto` on AMX would not)
        "optim.ns_dtype=fp32"]
TINY_MOE = TINY + ["model.moe.d_expert=16", "model.moe.n_experts=4", "model.moe.top_k=2"]


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    os.environ["MOELAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "moelab-cache")


def write_corpus(p: Path) -> Path:
    """The tests' small corpus at `p`: enough lines for a few documents."""
    p.write_text("".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}.\n"
                         for i in range(1200)))
    return p


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small corpus written by the test: enough lines for a few documents."""
    return write_corpus(tmp_path / "corpus.txt")


def namespaces_work() -> bool:
    """Whether `unshare -rm` (a user and mount namespace) works here: a read-only bind mount and a
    small tmpfs give the tests a read-only folder and a full disk, even as root."""
    import subprocess

    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_cli(*args: str, check: bool = True):
    """Run `python -m moelab ...` in a fresh process and return (rc, stdout, stderr)."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "moelab", *args], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"moelab {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.returncode, r.stdout, r.stderr


def run_main(capsys, *args: str, check: bool = True):
    """`moelab ...` in this process (no interpreter and torch start-up): (rc, stdout, stderr).
    For commands whose test needs no process of its own (peak memory, kill -9 do)."""
    from moelab.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    if check and rc != 0:
        raise AssertionError(f"moelab {' '.join(map(str, args))} failed ({rc}):\n{err[-3000:]}")
    return rc, out, err


# `moelab scaling` micro-grids (tests/analysis/test_scaling*.py)
@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> Path:
    """A corpus varied enough that tiny models do not exhaust it within the grid: the first 80
    modules of this Python's standard library, as text files."""
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]:
        shutil.copy(f, root / f"{f.stem}.txt")
    return root


def grid_args(data: Path, out: Path, tokens: str = "8192,32768") -> list[str]:
    """`moelab scaling` arguments for a 2 x 2 micro-grid of tiny-dense and tiny-moe on `data`."""
    small = ["model.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32", "train.batch_size=8",
             "train.eval_batches=8", "data.tokenizer_train_bytes=300000", "train.threads=1"]  # fmt: skip
    return ["scaling", "--dense", "tiny-dense", "--moe", "tiny-moe", "--data", str(data), "--out", str(out),
            "--widths", "32,64", "--tokens", tokens, "--quiet", *(a for s in small for a in ("--set", s))]  # fmt: skip
