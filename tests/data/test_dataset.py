"""Tokenized datasets (`moelab tokenize`): round trip, the split, every source kind giving
the same tokens, resuming after SIGKILL, reuse, per-rank batch slices, clear reports."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, run_cli, run_main
from moelab import ConfigError
from moelab.errors import OutputExists
from moelab.data import Sampler, TokenDataset, load_documents, prepare_data, split_documents, tokenize_source
from moelab.data.loader import rank_slice
from moelab.data.tokenizer import train_tokenizer

TEXTS = [f"document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(40 + i % 13)) + "\n" for i in range(120)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400, 10**6)


def all_docs(ds: TokenDataset) -> list[list[int]]:
    return [d.tolist() for s in ("train", "val") for d in ds.documents(s)]


def test_round_trip_and_split_match_the_in_memory_rule(tmp_path, tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i:03d}.txt").write_text(t)
    ds = TokenDataset(tokenize_source(str(folder), tmp_path / "ds", tok, chunk_bytes=1500, quiet=True))
    assert len(ds.manifest["splits"]["train"]["shards"]) > 3  # several chunks
    train, val = split_documents(load_documents(str(folder)), 0.05)
    eos = tok.token_to_id("<|endoftext|>")
    for split, docs in (("train", train), ("val", val)):
        got = list(ds.documents(split))
        assert len(got) == len(docs) > 0
        for ids, d in zip(got, docs, strict=True):
            assert ids[-1] == eos and tok.decode(ids[:-1].tolist()) == d.text
    # the training stream is the documents' tokens back to back, across shard boundaries
    stream = ds.split("train")
    assert np.array_equal(stream[0:len(stream)], np.concatenate(list(ds.documents("train"))))
    assert np.array_equal(stream[5:4000], np.concatenate(list(ds.documents("train")))[5:4000])


def test_every_source_kind_gives_the_same_tokens(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    plain = tmp_path / "corpus.txt"
    plain.write_text("".join(TEXTS * 3))
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "corpus.txt.gz", "wt") as f:
        f.write(plain.read_text())
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "corpus.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    base = TokenDataset(tokenize_source(str(plain), tmp_path / "d0", tok, quiet=True))
    for src in (tmp_path / "gz" / "corpus.txt.gz", tmp_path / "zst" / "corpus.txt.zst"):
        other = TokenDataset(tokenize_source(str(src), tmp_path / f"out-{src.suffix[1:]}", tok, quiet=True))
        for s in ("train", "val"):  # same documents under the same names: the same shards
            assert np.array_equal(other.split(s)[0:10**9], base.split(s)[0:10**9])

    # one document per record: jsonl (plain and compressed), parquet, a datasets folder
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with gzip.open(tmp_path / "data.jsonl.gz", "wt") as f:
        f.write(jsonl.read_text())
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "data.parquet", row_group_size=16)
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "hfds"))
    want = sorted(tok.encode(t, add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")] for t in TEXTS)
    for src in ("data.jsonl", "data.jsonl.gz", "data.parquet", "hfds"):
        ds = TokenDataset(tokenize_source(str(tmp_path / src), tmp_path / f"out-{src}", tok, quiet=True))
        assert sorted(all_docs(ds)) == want, src


KILL_SCRIPT = r"""
import sys, time, pathlib
import moelab.data.dataset as dsm
real, calls = dsm._write_chunk, {"n": 0}
def slow(*a, **k):
    calls["n"] += 1
    if calls["n"] == 4:  # three chunks finished: signal the parent, then hang
        pathlib.Path(sys.argv[1]).write_text("now")
        time.sleep(60)
    return real(*a, **k)
dsm._write_chunk = slow
from moelab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_tokenize_resumes_to_the_same_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i:03d}.txt").write_text(t * 3)
    args = ["tokenize", str(folder), "--vocab-size", "300", "--chunk-bytes", "2000", "--quiet"]
    run_cli(*args, "--out", str(tmp_path / "whole"))
    script, flag = tmp_path / "kill.py", tmp_path / "flag"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), str(flag), *args, "--out", str(tmp_path / "cut")], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "cut" / "progress.json").read_text())["chunks"].__len__() == 3
    assert not (tmp_path / "cut" / "manifest.json").exists()
    run_cli(*args, "--out", str(tmp_path / "cut"))
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == whole
    for name in whole:
        if name != "manifest.json":
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "cut"))
    assert m1["splits"] == m2["splits"]


def test_reuse_reports_and_errors(tmp_path, tok, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, t in enumerate(TEXTS[:10]):
        (folder / f"{i}.txt").write_text(t)
    (folder / "blob.bin").write_bytes(b"\xff\xfe\x00\x01" * 10)
    out = tokenize_source(str(folder), tmp_path / "ds", tok, quiet=True)
    assert "skipped 1 file(s) that are not UTF-8 text: blob.bin" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["skipped_files"] == ["blob.bin"]
    stamp = (out / "train-00000.bin").stat().st_mtime_ns
    tokenize_source(str(folder), out, tok, quiet=True)  # unchanged source and tokenizer: reused
    assert (out / "train-00000.bin").stat().st_mtime_ns == stamp
    (folder / "extra.txt").write_text("a new document\n")  # a changed source is not reused silently
    with pytest.raises(OutputExists, match="already holds another dataset"):
        tokenize_source(str(folder), out, tok, quiet=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\xff\xff")
    with pytest.raises(ConfigError, match="data source '.*empty' contains no text.*x.bin"):
        tokenize_source(str(empty), tmp_path / "ds2", tok, quiet=True)


def test_rank_slices_partition_the_global_batch():
    one = Sampler(100, 8, seed=3)
    two = [Sampler(100, 8, seed=3) for _ in range(2)]
    for _ in range(20):  # crosses epochs
        batch = one.next()
        parts = [rank_slice(s.next(), r, 2) for r, s in enumerate(two)]
        assert not set(parts[0]) & set(parts[1])
        assert np.array_equal(np.concatenate(parts), batch)
    with pytest.raises(ConfigError, match="do not split evenly over 3"):
        rank_slice(one.next(), 0, 3)


def test_train_on_a_dataset_equals_train_on_its_source(tmp_path, text_file, capsys):
    run_main(capsys, "train", "tiny-dense", "--data", str(text_file), "--out", str(tmp_path / "a"), "--steps", "3", "--quiet",
            *TINY)
    run_main(capsys, "tokenize", str(text_file), "--out", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "a"), "--quiet")
    run_main(capsys, "train", "tiny-dense", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "b"), "--steps", "3",
            "--quiet", *TINY)
    la, lb = ([json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert la == lb
    # eval reads the dataset too, and gives what it gives on the source itself
    on_ds = json.loads(run_main(capsys, "eval", str(tmp_path / "b"), "--data", str(tmp_path / "ds"), "--json")[1])
    on_src = json.loads(run_main(capsys, "eval", str(tmp_path / "b"), "--data", str(text_file), "--json")[1])
    assert on_ds == on_src
    # a dataset made with another tokenizer is refused by name
    run_main(capsys, "tokenize", str(text_file), "--out", str(tmp_path / "ds2"), "--vocab-size", "300", "--quiet")
    with pytest.raises(ConfigError, match="another tokenizer"):
        prepare_data(str(tmp_path / "ds2"), 32, 512, tokenizer_path=tmp_path / "a" / "tokenizer.json")


@pytest.mark.parametrize("n_lines", [1200, 3000])
def test_stream_equals_the_in_memory_pipeline(tmp_path, n_lines):
    """The pipeline before datasets, written out here: split the documents in memory, train
    the tokenizer on the training texts, encode each document followed by end-of-text.
    prepare_data (through a cached dataset) must give the same tokenizer and streams;
    1,200 lines make 6 blocks (the split's fallback holds out the last), 3,000 make 15."""
    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"row {i}: alpha {i % 13} beta {i % 7} gamma {i * 7 % 11}\n" for i in range(n_lines)))
    train_docs, val_docs = split_documents(load_documents(str(src)), 0.05)
    tok = train_tokenizer((d.text for d in train_docs), 400, 300_000)
    eos = tok.token_to_id("<|endoftext|>")

    def stream(docs):
        return np.concatenate([np.array(tok.encode(d.text, add_special_tokens=False).ids + [eos]) for d in docs])

    d = prepare_data(str(src), 16, 400, tokenizer_train_bytes=300_000)
    assert d.tokenizer.to_str() == tok.to_str()
    for part, docs in ((d.train, train_docs), (d.val, val_docs)):
        want = stream(docs)
        assert len(part.tokens) == len(want) and np.array_equal(part.tokens[0: len(want)], want)
