"""Tokenized datasets: a source tokenized once into memory-mapped token shards.

DATASET/
  manifest.json       format, source, its fingerprint, tokenizer hash, split rule, dtype,
                      and per split the shard files with their token and document counts
  tokenizer.json      the tokenizer the shards were made with
  train-NNNNN.bin     tokens of the chunk's training documents, each followed by
                      end-of-text (uint16 when the vocabulary fits, else uint32)
  train-NNNNN.idx     uint64 end offset of each document in that .bin
  val-NNNNN.bin/.idx  the same for the validation documents

The source streams through once, in chunks of about `chunk_bytes` of text; each chunk is
encoded with the tokenizers library's own batch threading, in slices that bound the
memory its encodings take, and written as one train and one val shard, each renamed into
place when complete. `progress.json` records finished chunks, so a killed run resumes
after its last finished chunk and ends with exactly the files an uninterrupted run
writes. The split is the document-name hash of `sources.split_documents`, and the
training stream (shards concatenated in order) is token for token what `prepare_data`
packed before datasets existed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ..errors import ConfigError, OutputExists
from ..store.outputs import restore, save_tokenizer, set_aside, write_json
from ..store.run import load_tokenizer
from .sources import FORMAT, PROGRESS_FILE, Document, SourceReport, is_validation, iter_documents, source_fingerprint
from .tokenizer import eos_id

CHUNK_BYTES = 64 << 20  # source text per chunk: the unit of resumption
ENCODE_BYTES = 4 << 20  # text per encode call: bounds the transient encodings
SPLITS = ("train", "val")


def tokenizer_hash(tok: Tokenizer) -> str:
    """A short hash of a tokenizer's full definition (vocabulary, merges, settings)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def is_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `tokenize_source` (complete)."""
    m = Path(path) / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("format") == FORMAT


def _write_array(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a write error carries no file name of its own
        e.filename = e.filename or str(path)
        raise
    os.replace(tmp, path)


def _encode(tok: Tokenizer, docs: list[Document], eos: int, dtype) -> Iterator[tuple[Document, np.ndarray]]:
    """Each document's token ids followed by end-of-text, encoded in parallel slices."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster, less memory
    start = 0
    while start < len(docs):
        end, size = start, 0
        while end < len(docs) and (size < ENCODE_BYTES or end == start):
            size += len(docs[end].text)
            end += 1
        for d, enc in zip(
            docs[start:end], encode([d.text for d in docs[start:end]], add_special_tokens=False), strict=True
        ):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[:-1] = enc.ids
            ids[-1] = eos
            yield d, ids
        start = end


def _write_chunk(out: Path, c: int, tok: Tokenizer, docs: list[Document], val_fraction: float, dtype) -> dict:
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for d, ids in _encode(tok, docs, eos_id(tok), dtype):
        parts["val" if is_validation(d.name, val_fraction) else "train"].append(ids)
    info: dict = {"docs": len(docs), "bytes": sum(len(d.text.encode()) for d in docs)}
    for s in SPLITS:
        lens = np.array([len(a) for a in parts[s]], dtype=np.uint64)
        _write_array(out / f"{s}-{c:05d}.bin", np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype))
        _write_array(out / f"{s}-{c:05d}.idx", np.cumsum(lens, dtype=np.uint64))
        info[s] = {"tokens": int(lens.sum()), "docs": len(lens)}
    return info


def _check_out(out: Path, key: dict, overwrite: bool) -> dict | None:
    """The progress of an unfinished run of the same dataset to resume, or None to start.
    A finished dataset of the same key is signalled by returning {'done': True}, another
    one (or other files) to replace, with `overwrite`, by {'replace': True}."""
    if (out / "manifest.json").is_file():
        if json.loads((out / "manifest.json").read_text()).get("key") == key:
            return {"done": True}
    elif (out / PROGRESS_FILE).is_file():
        progress = json.loads((out / PROGRESS_FILE).read_text())
        if progress.get("key") == key:
            return progress
    if out.exists() and any(out.iterdir()):
        dataset = (out / "manifest.json").is_file() or (out / PROGRESS_FILE).is_file()
        if not dataset:  # --overwrite replaces only an earlier dataset, never a run or one's own files
            raise OutputExists(
                f"--out {out} holds files that are not a dataset: choose a new folder"
                + (" (--overwrite replaces only an earlier dataset)" if overwrite else "")
            )
        if not overwrite:
            raise OutputExists(
                f"--out {out} already holds another dataset (another source, changed source files, or another "
                "tokenizer): choose a new folder, or pass --overwrite to replace it"
            )
        return {"replace": True}
    return None


def resumable_tokenizer(source: str, out: Path, text_field: str, val_fraction: float) -> Tokenizer | None:
    """The tokenizer of an unfinished (or finished) dataset of this same source in `out`,
    so that a rerun continues it rather than training a tokenizer again; else None."""
    for name in (PROGRESS_FILE, "manifest.json"):
        f = out / name
        if f.is_file() and (out / "tokenizer.json").is_file():
            key = json.loads(f.read_text()).get("key", {})
            if (key.get("source"), key.get("fingerprint"), key.get("text_field"), key.get("val_fraction")) == (
                source,
                source_fingerprint(source),
                text_field,
                val_fraction,
            ):
                return load_tokenizer(out / "tokenizer.json")
    return None


def tokenize_source(
    source: str,
    out: str | Path,
    tok: Tokenizer,
    *,
    text_field: str = "text",
    val_fraction: float = 0.05,
    chunk_bytes: int = CHUNK_BYTES,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Tokenize `source` into the dataset folder `out` (see the module docstring) and return
    it. A finished dataset of the same source (unchanged files), tokenizer, split and text
    field is reused as it is; an unfinished one is resumed. Files that are not UTF-8 text
    are named on stderr; a source without text is a ConfigError naming it."""
    out = Path(out)
    key = {
        "format": FORMAT,
        "source": source,
        "fingerprint": source_fingerprint(source),
        "tokenizer": tokenizer_hash(tok),
        "text_field": text_field,
        "val_fraction": val_fraction,
    }
    found = _check_out(out, key, overwrite)
    if found and found.get("done"):
        return out
    # --overwrite keeps the old folder aside until the new dataset is complete
    aside = set_aside(out) if found and found.get("replace") else None
    progress = found if found and "chunks" in found else {"key": key, "chunks": []}
    existed, was_empty = out.exists(), not out.exists() or not any(out.iterdir())
    try:
        _tokenize_into(out, source, tok, progress, text_field, val_fraction, chunk_bytes, quiet)
    except BaseException as e:
        if aside is not None:
            restore(out, aside)
        # nothing to resume, or a source that fails the same way every time (too few documents, no text): a fresh
        # output leaves no half-made dataset behind
        elif was_empty and (not progress["chunks"] or isinstance(e, ConfigError)):
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def _tokenize_into(
    out: Path,
    source: str,
    tok: Tokenizer,
    progress: dict,
    text_field: str,
    val_fraction: float,
    chunk_bytes: int,
    quiet: bool,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.tmp"), *out.glob(".*.tmp-*")]:  # shards' and write_json's, left by a kill
        stale.unlink()
    save_tokenizer(tok, out / "tokenizer.json")
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    report = SourceReport()
    stream = iter_documents(source, text_field, report)
    skip = sum(c["docs"] for c in progress["chunks"])
    done_bytes = sum(c["bytes"] for c in progress["chunks"])
    for _ in range(skip):  # finished chunks: read past their documents, do not encode them again
        next(stream)

    bar = tqdm(
        total=None,
        initial=done_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenize {source}",
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    t0, tokens = time.perf_counter(), sum(c["train"]["tokens"] + c["val"]["tokens"] for c in progress["chunks"])
    docs: list[Document] = []
    size = 0
    for doc in _with_end(stream):
        if doc is not None:
            docs.append(doc)
            size += len(doc.text)
        if docs and (size >= chunk_bytes or doc is None):
            info = _write_chunk(out, len(progress["chunks"]), tok, docs, val_fraction, dtype)
            progress["chunks"].append(info)
            write_json(out / PROGRESS_FILE, progress)
            tokens += info["train"]["tokens"] + info["val"]["tokens"]
            bar.update(info["bytes"])
            bar.set_postfix(tokens=f"{tokens:,}")
            docs, size = [], 0
    bar.close()
    if report.skipped:
        print(f"{source}: {report.summary()}", file=sys.stderr)
    _finish(out, source, progress, dtype, report)
    if not quiet:
        mb = sum(c["bytes"] for c in progress["chunks"]) / 1e6
        print(
            f"tokenized {source}: {mb:,.1f} MB of text -> {tokens:,} tokens in {out} "
            f"({time.perf_counter() - t0:.1f} s this run)",
            file=sys.stderr,
        )


def _with_end(stream: Iterator[Document]) -> Iterator[Document | None]:
    yield from stream
    yield None


def _move_doc(out: Path, src: tuple[str, int], dst: tuple[str, int], first: bool, dtype, chunks: list[dict]) -> None:
    """Move the first (or last) document of shard `src` to the start (or end) of shard `dst`:
    the split's fallback when the hash rule holds out no document, or all of them."""
    (s_split, s_c), (d_split, d_c) = src, dst
    s_bin, s_idx = _read_shard(out, s_split, s_c, dtype)
    d_bin, d_idx = _read_shard(out, d_split, d_c, dtype)
    ends = np.concatenate([[0], s_idx]).astype(np.int64)
    cut = ends[1] if first else ends[-2]
    doc, rest = (s_bin[:cut], s_bin[cut:]) if first else (s_bin[cut:], s_bin[:cut])
    rest_idx = (s_idx[1:] - cut) if first else s_idx[:-1]
    d_bin = np.concatenate([doc, d_bin]) if first else np.concatenate([d_bin, doc])
    d_lens = np.diff(np.concatenate([[0], d_idx]).astype(np.int64)).tolist()
    d_lens = [len(doc), *d_lens] if first else [*d_lens, len(doc)]
    for split, c, b, i in ((s_split, s_c, rest, rest_idx), (d_split, d_c, d_bin, np.cumsum(d_lens, dtype=np.uint64))):
        _write_array(out / f"{split}-{c:05d}.bin", np.asarray(b, dtype=dtype))
        _write_array(out / f"{split}-{c:05d}.idx", np.asarray(i, dtype=np.uint64))
    for split, c, delta in ((s_split, s_c, -1), (d_split, d_c, 1)):
        chunks[c][split]["docs"] += delta
        chunks[c][split]["tokens"] += delta * len(doc)


def _read_shard(out: Path, split: str, c: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.fromfile(out / f"{split}-{c:05d}.bin", dtype=dtype),
        np.fromfile(out / f"{split}-{c:05d}.idx", dtype=np.uint64),
    )


def _finish(out: Path, source: str, progress: dict, dtype, report: SourceReport) -> None:
    chunks = progress["chunks"]
    n = {s: sum(c[s]["docs"] for c in chunks) for s in SPLITS}
    if n["train"] + n["val"] == 0:
        raise ConfigError(
            f"data source '{source}' contains no text" + (f" ({report.summary()})" if report.skipped else "")
        )
    if n["train"] + n["val"] < 2:
        raise ConfigError(
            f"data source '{source}' has 1 document; at least 2 are needed to hold one out for validation"
        )
    if n["val"] == 0:  # hold out the last training document
        c = max(i for i, ch in enumerate(chunks) if ch["train"]["docs"])
        _move_doc(out, ("train", c), ("val", c), first=False, dtype=dtype, chunks=chunks)
    elif n["train"] == 0:  # train on the first validation document
        c = min(i for i, ch in enumerate(chunks) if ch["val"]["docs"])
        _move_doc(out, ("val", c), ("train", c), first=True, dtype=dtype, chunks=chunks)
    manifest = {
        "format": FORMAT,
        "key": progress["key"],
        "source": source,
        "dtype": np.dtype(dtype).name,
        "val_fraction": progress["key"]["val_fraction"],
        "text_field": progress["key"]["text_field"],
        "tokenizer": progress["key"]["tokenizer"],
        "skipped_files": report.skipped,
        "text_bytes": sum(c["bytes"] for c in chunks),
        "splits": {
            s: {
                "tokens": sum(c[s]["tokens"] for c in chunks),
                "docs": sum(c[s]["docs"] for c in chunks),
                "shards": [
                    {"file": f"{s}-{i:05d}.bin", "tokens": c[s]["tokens"], "docs": c[s]["docs"]}
                    for i, c in enumerate(chunks)
                ],
            }
            for s in SPLITS
        },
    }
    write_json(out / "manifest.json", manifest)
    (out / PROGRESS_FILE).unlink(missing_ok=True)


class TokenStream:
    """The shards of one split as one read-only token sequence: `len()` and slicing
    across shard boundaries, each shard memory-mapped (nothing is read until sliced)."""

    def __init__(self, files: list[Path], dtype: str):
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size]
        self.ends = np.cumsum([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        out, pos = [], start
        i = int(np.searchsorted(self.ends, start, side="right"))
        while pos < stop and i < len(self.arrays):
            base = int(self.ends[i]) - len(self.arrays[i])
            take = self.arrays[i][pos - base : min(stop, int(self.ends[i])) - base]
            out.append(take)
            pos += len(take)
            i += 1
        if not out:
            return np.zeros(0, dtype=self.arrays[0].dtype if self.arrays else np.uint16)
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])


class TokenDataset:
    """A dataset folder written by `tokenize_source`, opened for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_dataset(self.path):
            raise ConfigError(
                f"{self.path}: not a tokenized dataset (no complete manifest.json); "
                "make one with `moelab tokenize SRC --out DATASET`"
            )
        self.manifest = json.loads((self.path / "manifest.json").read_text())

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with."""
        return load_tokenizer(self.path / "tokenizer.json")

    def split(self, name: str) -> TokenStream:
        """The concatenated token stream of split `name` ('train' or 'val')."""
        return self.stream(name)

    def stream(self, *splits: str) -> TokenStream:
        """The token streams of `splits`, one after the other."""
        files = [self.path / s["file"] for name in splits for s in self.manifest["splits"][name]["shards"]]
        return TokenStream(files, self.manifest["dtype"])

    def documents(self, name: str) -> Iterator[np.ndarray]:
        """Each document's tokens (with its end-of-text) of split `name`, in order."""
        for s in self.manifest["splits"][name]["shards"]:
            data = np.fromfile(self.path / s["file"], dtype=self.manifest["dtype"])
            ends = np.fromfile(self.path / s["file"].replace(".bin", ".idx"), dtype=np.uint64).astype(np.int64)
            yield from np.split(data, ends[:-1]) if len(ends) else []
