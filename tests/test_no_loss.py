"""Nothing lost, nothing silent, on every command (docs/reliability.md): each command that
writes, against an `--out` that is its own input, inside it, a file, a dangling link, in
a read-only folder and on a full disk; each command that reads data, against a missing
path, a truncated .gz, a corrupt .zst, a binary .jsonl and an interrupted dataset. Every
case must end in exit code 2 and one line, with the input and any earlier output
byte-identical afterwards.

The output cases run in one process (tests/faults.py) inside a user and mount namespace
(`unshare -rm`), where a read-only bind mount and a tmpfs with a few KiB free give the
real EROFS and ENOSPC, also to root."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, TINY_MOE, namespaces_work
from faults import tree_hash
from moelab.cli import main
from moelab.run_config import load_config
from moelab.train import train

HERE = Path(__file__).parent
PATH_CASES = ["self", "inside", "file", "symlink"]
DISK_CASES = ["readonly_new", "readonly_earlier", "full_new", "full_earlier"]
TINY_SETS = [a for o in TINY for a in ("--set", o)]
WRITERS = ["train", "finetune", "distill", "upcycle", "import", "export", "quantize", "prune-experts",
           "merge-experts", "consolidate", "tokenize", "compare", "lr-sweep", "experts"]


def tiny_run(path: Path, recipe: str, data: Path, steps: int = 4) -> Path:
    cfg = load_config(recipe, [*(TINY_MOE if recipe == "tiny-moe" else TINY)])
    cfg.data.source, cfg.train.steps = str(data), steps
    train(cfg, path, quiet=True)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    text = "".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}.\n" for i in range(1200))
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    texts = root / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"part{i}.txt").write_text(text[i * 20000:(i + 1) * 20000])
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"say {i}:", "completion": f" {i} fox"}) + "\n" for i in range(40)))
    run, dense = tiny_run(root / "run", "tiny-moe", corpus), tiny_run(root / "dense", "tiny-dense", corpus)
    assert main(["export", str(run), "--out", str(root / "hf")]) == 0
    drun = root / "drun"  # a multi-process (DCP) checkpoint, from a one-process torchrun
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "-m", "moelab", "train", "tiny-moe", "--data", str(corpus), "--out", str(drun), "--steps",
                        "2", "--quiet", *TINY_MOE], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "corpus": corpus, "texts": texts, "sft": sft, "run": run, "dense": dense,
            "hf": root / "hf", "drun": drun}


def writer_specs(i) -> dict:
    """Each command that writes: its arguments ("{OUT}" for --out), the input an --out
    may not touch, and whether it takes --overwrite."""
    run, dense, corpus, texts = str(i["run"]), str(i["dense"]), str(i["corpus"]), str(i["texts"])
    sets = [a for o in TINY_MOE for a in ("--set", o)]
    specs = {
        "train": (["train", "tiny-moe", "--data", corpus, "--init", run, "--out", "{OUT}", "--steps", "2",
                   "--quiet", *TINY_MOE], run),
        "finetune": (["finetune", run, "--data", str(i["sft"]), "--out", "{OUT}", "--recipe", "full", "--steps", "1",
                      "--quiet"], run),
        "distill": (["distill", run, "--student", "tiny-dense", "--data", corpus, "--out", "{OUT}", "--steps", "1",
                     "--quiet", *TINY], run),
        "upcycle": (["upcycle", dense, "--experts", "2", "--top-k", "1", "--out", "{OUT}"], dense),
        "import": (["import", str(i["hf"]), "--out", "{OUT}"], str(i["hf"])),
        "export": (["export", run, "--out", "{OUT}"], run),
        "quantize": (["quantize", run, "--bits", "8", "--group-size", "16", "--out", "{OUT}"], run),
        "prune-experts": (["prune-experts", run, "--keep", "2", "--calib", corpus, "--out", "{OUT}"], run),
        "merge-experts": (["merge-experts", run, "--experts", "2", "--calib", corpus, "--out", "{OUT}"], run),
        "consolidate": (["consolidate", str(i["drun"]), "--out", "{OUT}"], str(i["drun"])),
        "tokenize": (["tokenize", texts, "--out", "{OUT}", "--vocab-size", "300", "--quiet"], texts),
        "compare": (["compare", run, dense, "--out", "{OUT}"], run),
        "lr-sweep": (["lr-sweep", "--recipe", "tiny-moe", "--sizes", "32", "--lrs", "0.01", "--data", texts,
                      "--out", "{OUT}", "--steps", "1", "--quiet", *sets], texts),
        "experts": (["experts", run, "--data", corpus, "--split", "all", "--tokens", "500", "--out", "{OUT}"], run),
    }
    assert sorted(specs) == sorted(WRITERS)
    # the file that marks each command's kind of output: --overwrite replaces only an earlier output of that kind
    runs = "config.yaml"
    markers = {"export": "config.json", "compare": "summary.json", "experts": "experts.json",
               "tokenize": "manifest.json", "lr-sweep": None}  # fmt: skip
    return {name: {"args": a, "self": s, "overwrite": name != "lr-sweep", "marker": markers.get(name, runs)}
            for name, (a, s) in specs.items()}  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    ns = namespaces_work()
    if not ns and os.geteuid() == 0:
        pytest.fail("the read-only and full-disk cases need `unshare -rm` (user namespaces) when run as root: "
                    "chmod does not bind root; install util-linux or run as another user")
    resume = ["train", "tiny-moe", "--data", str(inputs["corpus"]), "--out", "{OUT}", "--resume", "--steps", "8",
              "--quiet", *TINY_MOE]
    spec = {"work": str(work), "commands": writer_specs(inputs), "resume": {"args": resume, "run": str(inputs["run"])},
            "inputs": [str(inputs[k]) for k in ("corpus", "texts", "sft", "run", "dense", "hf", "drun")]}
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(HERE / "faults.py"), str(work / "spec.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MOELAB_IN_NAMESPACE="1" if ns else "0")
    r = subprocess.run((["unshare", "-rm"] if ns else []) + cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_one_line(res: dict, command: str) -> str:
    assert not res["traceback"], res["traceback"]
    assert res["rc"] == 2, res
    assert res["tail"] and res["tail"][-1].startswith(f"moelab {command}: error: "), res["tail"]
    return res["tail"][-1]


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_onto_or_into_the_input_is_refused(outcomes, command):
    res = outcomes["commands"][command]
    assert "nest inside the input" in assert_one_line(res["self"], command)
    assert "nest inside the input" in assert_one_line(res["inside"], command)
    assert "is a file" in assert_one_line(res["file"], command) and res["file_same"]
    assert "symbolic link" in assert_one_line(res["symlink"], command) and res["symlink_still_dangling"]


@pytest.mark.parametrize("command", WRITERS)
def test_a_read_only_folder_and_a_full_disk_lose_nothing(outcomes, command):
    res = outcomes["commands"][command]
    assert "read-only file system" in assert_one_line(res["readonly_new"], command) or not outcomes["namespace"]
    assert not res["readonly_new_exists"]
    line = assert_one_line(res["full_new"], command)
    assert ("no space left" in line) if outcomes["namespace"] else ("file too large" in line), line
    assert f"full-{command}/new" in line and ".tmp-" not in line, line  # the path the user named, not the staging
    assert not res["full_new_exists"] and res["full_leftovers"] == []  # no staged or set-aside folder stays
    if command != "lr-sweep":  # the one writer without --overwrite: a sweep continues in place
        assert_one_line(res["readonly_earlier"], command)
        assert res["readonly_earlier_same"]
        assert "no space left" in assert_one_line(res["full_earlier"], command) or not outcomes["namespace"]
        assert res["full_earlier_same"], "the earlier output changed"
    assert all(outcomes["inputs_same"].values()), outcomes["inputs_same"]


def test_a_resumed_run_on_a_full_disk_keeps_its_checkpoints(outcomes):
    res = outcomes["resume"]
    assert "no space left" in assert_one_line(res, "train") or not outcomes["namespace"]
    assert res["checkpoints_same"]  # the step-4 checkpoint intact, no temporary folder left


# ------------------------------------------------------------ damaged and missing data
@pytest.fixture(scope="module")
def bad_sources(inputs, tmp_path_factory):
    import zstandard

    root = tmp_path_factory.mktemp("bad")
    raw = inputs["corpus"].read_bytes()
    gz = gzip.compress(raw)
    (root / "cut.txt.gz").write_bytes(gz[: len(gz) // 2])
    zst = bytearray(zstandard.ZstdCompressor().compress(raw))
    zst[len(zst) // 2: len(zst) // 2 + 64] = b"\x00" * 64
    (root / "bad.jsonl.zst").write_bytes(bytes(zst))
    (root / "binary.jsonl").write_bytes(b'{"text": "ok", "prompt": "p", "completion": " c"}\n\xff\xfe\x00\x01garbage\n')
    ds = root / "interrupted"  # what a killed `moelab tokenize` leaves: chunks and progress, no manifest
    assert main(["tokenize", str(inputs["texts"]), "--out", str(ds), "--vocab-size", "300", "--quiet",
                 "--chunk-bytes", "20000"]) == 0
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").unlink()
    first = manifest["splits"]["train"]["shards"][0]
    (ds / "progress.json").write_text(json.dumps({"key": manifest["key"], "chunks": [
        {"docs": first["docs"], "bytes": 1, "train": {"tokens": first["tokens"], "docs": first["docs"]},
         "val": {"tokens": 0, "docs": 0}}]}))
    return {"missing": root / "missing.txt", "truncated_gz": root / "cut.txt.gz", "corrupt_zst": root / "bad.jsonl.zst",
            "binary_jsonl": root / "binary.jsonl", "interrupted_dataset": ds, "interrupted_hash": tree_hash(ds)}


READERS = {
    "train": lambda i, d, o: ["train", "tiny-moe", "--data", d, "--out", o, *TINY_MOE],
    "eval": lambda i, d, o: ["eval", str(i["run"]), "--data", d],
    "finetune": lambda i, d, o: ["finetune", str(i["run"]), "--data", d, "--out", o, "--recipe", "full"],
    "distill": lambda i, d, o: ["distill", str(i["run"]), "--student", "tiny-dense", "--data", d, "--out", o, *TINY],
    "prune-experts": lambda i, d, o: ["prune-experts", str(i["run"]), "--keep", "2", "--calib", d, "--out", o],
    "merge-experts": lambda i, d, o: ["merge-experts", str(i["run"]), "--experts", "2", "--calib", d, "--out", o],
    "tokenize": lambda i, d, o: ["tokenize", d, "--out", o, "--vocab-size", "300"],
    "compare": lambda i, d, o: ["compare", "tiny-dense", "--data", d, "--out", o, "--steps", "1", *TINY_SETS],
    "lr-sweep": lambda i, d, o: ["lr-sweep", "--recipe", "tiny-moe", "--sizes", "32", "--lrs", "0.01", "--data", d,
                                 "--out", o, "--steps", "1"],
    "experts": lambda i, d, o: ["experts", str(i["run"]), "--data", d, "--split", "all", "--out", o],
}
EXPECTED = {"missing": "does not exist", "truncated_gz": "is damaged", "corrupt_zst": "is damaged",
            "binary_jsonl": ":2: not UTF-8", "interrupted_dataset": "incomplete tokenized dataset"}


@pytest.mark.parametrize("command", sorted(READERS))
def test_bad_data_is_one_line_naming_it(inputs, bad_sources, tmp_path, capfd, command):
    for kind in EXPECTED:
        src = bad_sources[kind]
        out = tmp_path / f"out-{kind}"
        capfd.readouterr()
        assert main(READERS[command](inputs, str(src), str(out))) == 2, kind
        err = capfd.readouterr().err  # with the output of a training process compare starts
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"moelab {command}: error: ") and src.name in line, (kind, line)
        if command == "compare" and kind in ("truncated_gz", "corrupt_zst", "binary_jsonl"):
            # found by the training process, which printed its own line above compare's
            assert "training tiny-dense failed" in line and EXPECTED[kind] in err, (kind, err)
        elif command != "finetune" or kind in ("missing", "binary_jsonl"):  # finetune takes .jsonl files only
            assert EXPECTED[kind] in line, (kind, line)
        assert not out.exists(), kind
    assert tree_hash(bad_sources["interrupted_dataset"]) == bad_sources["interrupted_hash"]  # left to resume


def test_staging_left_by_a_killed_command_is_removed_by_the_next_one(tmp_path):
    """A kill -9 mid-command leaves its hidden staging folder; the next command writing the same output removes it -
    only a dead process's, of this host: a live process's staging and another host's are left alone."""
    import socket

    from moelab.store.outputs import staged_output

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    out = tmp_path / "report"
    stale = tmp_path / f".report.tmp-{host}-{int(dead.stdout)}"
    live = tmp_path / f".report.tmp-{host}-{os.getppid()}"  # the test runner's parent: alive
    elsewhere = tmp_path / f".report.tmp-another-host-{int(dead.stdout)}"
    for d in (stale, live, elsewhere):
        (d / "half").mkdir(parents=True)
        (d / "half" / "part.bin").write_bytes(b"x" * 1000)
    with staged_output(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_a_killed_compare_takes_its_trainings_with_it(tmp_path, text_file):
    """kill -9 of `moelab compare` while it trains: the training it started ends too (it watches its parent), instead
    of running on as an orphan on the cores."""
    import signal
    import time

    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "moelab", "compare", "tiny-dense", "--data", str(text_file), "--out", str(out),
           "--steps", "100000", "--quiet", *[a for o in TINY for a in ("--set", o)]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 120
    kids: list[int] = []
    while not kids and time.monotonic() < deadline:  # the training has started once compare has a child
        time.sleep(0.2)
        kids = [int(k) for k in children.read_text().split()] if children.exists() else []
    assert kids, "compare started no training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60  # it polls its parent once a second; a minute is generous on any host
    while time.monotonic() < deadline and any(Path(f"/proc/{k}").exists() and "Z" not in _state(k) for k in kids):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{k}").exists() and "Z" not in _state(k) for k in kids), "the training outlived compare"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
