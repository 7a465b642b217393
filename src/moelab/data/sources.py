"""Text sources -> documents, and a deterministic train/validation split by document.

SRC is `stdlib` (the running interpreter's standard-library `.py` files, tests and
site-packages excluded), a text file, a folder of text files, a `.jsonl` with a text
field, or a `.parquet` with a text column. A single text file is cut into blocks of
200 lines so that it, too, can be split by document.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
LINES_PER_BLOCK = 200


@dataclass(frozen=True)
class Document:
    """One document of a source: a stable name (the split and cache key depend on it) and its text."""

    name: str  # stable identifier: the split and the cache key depend on it
    text: str


def stdlib_files() -> list[Path]:
    """Sorted `.py` files of the standard library (pinned by relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary or non-UTF-8: not text


def _blocks(name: str, text: str) -> list[Document]:
    lines = text.splitlines(keepends=True)
    return [
        Document(f"{name}#{i // LINES_PER_BLOCK}", "".join(lines[i : i + LINES_PER_BLOCK]))
        for i in range(0, len(lines), LINES_PER_BLOCK)
    ]


def _jsonl(path: Path, field: str) -> list[Document]:
    docs = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path}:{n}: not UTF-8 text (expected one JSON object per line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise ConfigError(f"{path}:{n}: expected an object with a string field '{field}'")
            docs.append(Document(f"{path.name}:{n}", obj[field]))
    return docs


def _parquet(path: Path, field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow (pip install 'moelab[data]')") from None
    import pyarrow as pa

    try:
        table = pq.read_table(path, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from None
    if field not in table.column_names:
        raise ConfigError(f"{path}: no column '{field}' (columns: {table.column_names})")
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ConfigError(
            f"{path}: column '{field}' holds {col.type}, expected strings (data.text_field names the text column)"
        )
    return [Document(f"{path.name}:{i}", t) for i, t in enumerate(col.to_pylist()) if t]


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """All documents of a source, in a fixed order. Raises ConfigError naming the
    source when it is missing, empty or malformed."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [Document(p.relative_to(root).as_posix(), t) for p in stdlib_files() if (t := _read_text(p))]
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(
                f"data source '{source}' does not exist (expected 'stdlib', a text file, "
                "a folder, a .jsonl or a .parquet)"
            )
        if path.is_dir():
            docs = [
                Document(p.relative_to(path).as_posix(), t)
                for p in sorted(path.rglob("*"))
                if p.is_file() and (t := _read_text(p))
            ]
        elif path.suffix == ".jsonl":
            docs = _jsonl(path, text_field)
        elif path.suffix == ".parquet":
            docs = _parquet(path, text_field)
        else:
            text = _read_text(path)
            if text is None:
                raise ConfigError(f"data source '{source}' is not UTF-8 text")
            docs = _blocks(path.name, text)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ConfigError(f"data source '{source}' contains no text")
    return docs


def _unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Whole documents go to validation by a hash of their name: the same document lands
    on the same side on every machine, whatever other files exist."""
    if len(docs) < 2:
        raise ConfigError(
            f"data source has {len(docs)} document(s); at least 2 are needed to hold one out for validation"
        )
    val = [d for d in docs if _unit_hash(d.name) < val_fraction]
    train = [d for d in docs if _unit_hash(d.name) >= val_fraction]
    if not val:
        val, train = train[-1:], train[:-1]
    if not train:
        train, val = val[:1], val[1:]
    return train, val
