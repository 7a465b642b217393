"""Text sources -> a stream of documents, and a deterministic train/validation split by
document.

SRC is `stdlib` (the running interpreter's standard-library `.py` files, tests and
site-packages excluded), a text file, a folder of text files, a `.jsonl` with a text
field (and, optionally, a `domain` field), a `.parquet` with a text column, any of the
file kinds compressed as `.gz` or `.zst`, or a Hugging Face `datasets` folder written by
`save_to_disk`. A single text file is cut into blocks of 200 lines so that it, too, can
be split by document.

Every reader streams: a file is read in chunks, a `.jsonl` line by line, a `.parquet`
row group by row group, so memory does not grow with the corpus. A compressed file gives
the same documents, under the same names, as the file it decompresses to.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
LINES_PER_BLOCK = 200
CHUNK_CHARS = 1 << 20
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# A tokenized dataset folder (data/dataset.py) as sources must recognise it, to refuse one
# that `moelab tokenize` has not finished rather than read its shards as text.
FORMAT = "moelab-tokens/1"
PROGRESS_FILE = "progress.json"  # kept in the folder until the dataset is complete


@dataclass(frozen=True)
class Document:
    """One document of a source: a stable name (the split and cache key depend on it) and its text."""

    name: str  # stable identifier: the split and the cache key depend on it
    text: str
    domain: str | None = None  # a .jsonl line's `domain` field, when it has one (`moelab experts` groups by it)


@dataclass
class SourceReport:
    """What a pass over a source met besides documents: files skipped as not UTF-8 text."""

    skipped: list[str] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        """One line naming (up to `limit`) skipped files, or '' when none were."""
        if not self.skipped:
            return ""
        names = ", ".join(self.skipped[:limit]) + (
            f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        )
        return f"skipped {len(self.skipped)} file(s) that are not UTF-8 text: {names}"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted `.py` files of the standard library (pinned by relative path)."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary or non-UTF-8: not text


def _compression(path: Path) -> str | None:
    return {".gz": "gz", ".zst": "zst"}.get(path.suffix)


def _open_bytes(path: Path) -> IO[bytes]:
    """A binary stream of a plain, .gz or .zst file, decompressed."""
    kind = _compression(path)
    if kind == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile is a binary stream
    if kind == "zst":
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"{path}: reading .zst needs zstandard (pip install 'moelab[data]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _open_text(path: Path) -> IO[str]:
    """A text stream (strict UTF-8, universal newlines) of a plain, .gz or .zst file."""
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8")


def _blocks(name: str, f: IO[str]) -> Iterator[Document]:
    """Blocks of 200 lines (str.splitlines' line breaks) of a text stream, read in chunks."""
    lines: list[str] = []
    carry, block = "", 0
    while True:
        chunk = f.read(CHUNK_CHARS)
        parts = (carry + chunk).splitlines(keepends=True)
        # the last part may continue in the next chunk; keep it back until the end
        carry = parts.pop() if chunk and parts else ""
        lines.extend(parts)
        while len(lines) >= LINES_PER_BLOCK or (not chunk and lines):
            yield Document(f"{name}#{block}", "".join(lines[:LINES_PER_BLOCK]))
            del lines[:LINES_PER_BLOCK]
            block += 1
        if not chunk:
            return


def jsonl_lines(path: Path, f: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a .jsonl byte stream;
    ConfigError naming file and line for one that is not UTF-8 or not JSON."""
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}:{n}: not UTF-8 text (expected one JSON object per line)") from None
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _jsonl(path: Path, f: IO[bytes], name: str, field_name: str) -> Iterator[Document]:
    for n, obj in jsonl_lines(path, f):
        if not isinstance(obj, dict) or not isinstance(obj.get(field_name), str):
            raise ConfigError(f"{path}:{n}: expected an object with a string field '{field_name}'")
        domain = obj.get("domain")
        yield Document(f"{name}:{n}", obj[field_name], domain if isinstance(domain, str) else None)


def _parquet(path: Path, field_name: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow (pip install 'moelab[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from None
    if field_name not in pf.schema_arrow.names:
        raise ConfigError(f"{path}: no column '{field_name}' (columns: {pf.schema_arrow.names})")
    col_type = pf.schema_arrow.field(field_name).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise ConfigError(
            f"{path}: column '{field_name}' holds {col_type}, expected strings (data.text_field names the text column)"
        )
    i = 0
    for group in range(pf.num_row_groups):
        for t in pf.read_row_group(group, columns=[field_name]).column(field_name).to_pylist():
            if t:
                yield Document(f"{path.name}:{i}", t)
            i += 1


def _hf_dataset(path: Path, field_name: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading a datasets folder needs datasets (pip install 'moelab[data]')") from None
    ds = datasets.load_from_disk(str(path))
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, part in splits:
        if field_name not in part.column_names:
            raise ConfigError(f"{path}: no column '{field_name}' (columns: {part.column_names})")
        prefix = f"{path.name}/{split}" if split else path.name
        for i, row in enumerate(part.select_columns([field_name]).iter(batch_size=1000)):
            for j, t in enumerate(row[field_name]):
                if t:
                    yield Document(f"{prefix}:{i * 1000 + j}", t)


def _file(path: Path, field_name: str) -> Iterator[Document]:
    try:
        yield from _read_file(path, field_name)
    except _damaged_errors() as e:
        raise ConfigError(
            f"data source '{path}' is damaged: {type(e).__name__}: {e or 'unexpected end of data'} "
            "(a truncated or corrupt compressed file?); fetch or decompress it again"
        ) from None


def _damaged_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors raise on a truncated or corrupt file."""
    errs: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard

        errs += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errs


def _read_file(path: Path, field_name: str) -> Iterator[Document]:
    inner = Path(path.stem) if _compression(path) else path  # data.jsonl.gz reads as data.jsonl
    if inner.suffix == ".jsonl":
        with _open_bytes(path) as fb:
            yield from _jsonl(path, fb, inner.name, field_name)
    elif path.suffix == ".parquet":
        yield from _parquet(path, field_name)
    else:
        try:
            with _open_text(path) as ft:
                yield from _blocks(inner.name, ft)
        except UnicodeDecodeError:
            raise ConfigError(f"data source '{path}' is not UTF-8 text") from None


def iter_documents(source: str, text_field: str = "text", report: SourceReport | None = None) -> Iterator[Document]:
    """Stream the documents of a source in a fixed order (whitespace-only ones left out).
    Files of a folder that are not UTF-8 text are listed in `report`. Raises ConfigError
    naming the source when it is missing or malformed."""
    report = report if report is not None else SourceReport()
    if source == "stdlib":
        root = stdlib_root()
        for p in stdlib_files():
            text = _read_text(p)
            if text is None:
                report.skipped.append(p.relative_to(root).as_posix())
            elif text.strip():
                yield Document(p.relative_to(root).as_posix(), text)
        return
    path = check_source(source)
    if path.is_dir() and any((path / m).is_file() for m in HF_DATASET_MARKERS):
        docs: Iterator[Document] = _hf_dataset(path, text_field)
    elif path.is_dir():
        docs = _folder(path, report)
    else:
        docs = _file(path, text_field)
    for d in docs:
        if d.text.strip():
            yield d


def check_source(source: str) -> Path:
    """The path of a source that is not `stdlib`; ConfigError when it does not exist, or
    is a dataset folder whose `moelab tokenize` did not finish (its shards are no text)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"data source '{source}' does not exist (expected 'stdlib', a text file, a folder, a .jsonl, a .parquet, "
            "a .gz/.zst of those, a tokenized dataset, or a datasets folder)"
        )
    if not path.is_file() and not path.is_dir():  # a pipe (`<(cat f)`), a socket, a device: readable once
        raise ConfigError(
            f"data source '{source}' is a pipe or device, which can be read only once; moelab reads a source more "
            "than once (the tokenizer's training, then the tokens; the two splits): save it to a file first"
        )
    if path.is_dir() and _unfinished_dataset(path / PROGRESS_FILE):
        raise ConfigError(
            f"data source '{source}' is an incomplete tokenized dataset (its `moelab tokenize` was interrupted): "
            "run the same `moelab tokenize` command again to finish it"
        )
    return path


def _unfinished_dataset(progress: Path) -> bool:
    try:
        key = json.loads(progress.read_text()).get("key", {})
    except (OSError, ValueError, AttributeError):
        return False  # not ours: a folder of text may hold a file of that name
    return isinstance(key, dict) and key.get("format") == FORMAT


def _folder(path: Path, report: SourceReport) -> Iterator[Document]:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            text = _read_text(p)
            if text is None:
                report.skipped.append(p.relative_to(path).as_posix())
            else:
                yield Document(p.relative_to(path).as_posix(), text)


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """All documents of a source, in a fixed order, in memory (small sources and tests;
    training streams through `moelab.data.dataset`). Raises ConfigError naming the
    source when it is missing, empty or malformed."""
    docs = list(iter_documents(source, text_field))
    if not docs:
        raise ConfigError(f"data source '{source}' contains no text")
    return docs


def source_fingerprint(source: str) -> str:
    """A hash of what a source is made of (every file's path, size and modification time):
    it changes when any file does, without reading the text."""
    h = hashlib.sha256(source.encode())
    if source == "stdlib":
        files = stdlib_files()
    else:
        path = check_source(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def unit_hash(name: str) -> float:
    """A document name's position in [0, 1), uniform and the same on every machine."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether the split rule holds the document named `name` out for validation."""
    return unit_hash(name) < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Whole documents go to validation by a hash of their name: the same document lands
    on the same side on every machine, whatever other files exist. If the rule holds
    out none, the last document is; if it holds out all, the first trains."""
    if len(docs) < 2:
        raise ConfigError(
            f"data source has {len(docs)} document(s); at least 2 are needed to hold one out for validation"
        )
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    if not val:
        val, train = train[-1:], train[:-1]
    if not train:
        train, val = val[:1], val[1:]
    return train, val
