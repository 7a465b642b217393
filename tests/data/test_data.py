"""Sources, the split by document, packing and the resumable sampler."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from moelab import ConfigError
from moelab.data import Sampler, SamplerState, load_documents, prepare_data, split_documents
from moelab.data.sources import stdlib_files


def test_stdlib_is_sorted_and_excludes_tests():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/")[:-1])
    assert "json/decoder.py" in rel


def test_split_by_document_is_deterministic():
    docs = load_documents("stdlib")
    train, val = split_documents(docs, 0.05)
    assert len(val) > 10 and len(train) + len(val) == len(docs)
    assert not {d.name for d in train} & {d.name for d in val}
    # The rule depends on each document's name alone, not on which other files exist.
    train2, val2 = split_documents(docs[::2], 0.05)
    assert {d.name for d in val2} == {d.name for d in val} & {d.name for d in docs[::2]}


def test_folder_jsonl_parquet(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.txt").write_text("alpha")
    (tmp_path / "f" / "b.md").write_text("beta")
    (tmp_path / "f" / "c.bin").write_bytes(b"\xff\xfe\x00")
    assert [d.text for d in load_documents(str(tmp_path / "f"))] == ["alpha", "beta"]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]) + "\n")
    assert [d.text for d in load_documents(str(j))] == ["x y", "z"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d.parquet")
    assert [d.text for d in load_documents(str(tmp_path / "d.parquet"), "body")] == ["one", "two"]
    with pytest.raises(ConfigError, match="no column 'text'"):
        load_documents(str(tmp_path / "d.parquet"))


def test_prepare_data_packs_and_caches(text_file, tmp_path):
    d = prepare_data(str(text_file), seq_len=16, vocab_size=300, save_tokenizer_to=tmp_path / "tok.json")
    x, y = d.train.batch(np.array([0, 1]))
    assert x.shape == y.shape == (2, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert d.tokenizer.decode(x[0].tolist()) in text_file.read_text()
    again = prepare_data(str(text_file), seq_len=16, vocab_size=300, tokenizer_path=tmp_path / "tok.json")
    n = len(d.train.tokens)
    assert len(again.train.tokens) == n and np.array_equal(again.train.tokens[0:n], d.train.tokens[0:n])
    assert d.token_bytes.sum() > 0
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller"):
        prepare_data(str(text_file), seq_len=16, vocab_size=100, tokenizer_path=tmp_path / "tok.json")


def test_sampler_covers_epoch_and_resumes():
    s = Sampler(10, 4, seed=1)
    seen = np.concatenate([s.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    a = Sampler(10, 3, seed=7)
    for _ in range(4):
        a.next()
    b = Sampler(10, 3, seed=7, state=SamplerState(**vars(a.state)))
    assert all(np.array_equal(a.next(), b.next()) for _ in range(5))
