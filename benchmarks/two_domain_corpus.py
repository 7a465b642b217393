"""A two-domain corpus for `moelab experts` (docs/experts.md): Python code (this
interpreter's standard library) and English technical prose (Vim's reference manual,
`apt-get install vim-runtime`), each split by file into a training part and a held-out
part that training never sees, a fixed shuffle so the split is the same on every machine.

    python benchmarks/two_domain_corpus.py --out runs/two-domain
    # -> runs/two-domain/mixed/{code,prose} (train on `mixed`), runs/two-domain/heldout/{code,prose}
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from moelab.data.sources import stdlib_files, stdlib_root

VIM_DOC = Path("/usr/share/vim/vim90/doc")


def take(files: list[Path], dst: Path, budget: int, start: int, name) -> int:
    """Copy files from `start` on into `dst` until `budget` characters; returns the next index."""
    used, i = 0, start
    while used < budget and i < len(files):
        p, i = files[i], i + 1
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (dst / name(p)).write_text(text)
        used += len(text)
    return i


def main() -> None:
    """Write OUT/mixed/{code,prose} and OUT/heldout/{code,prose}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/two-domain")
    ap.add_argument("--train-chars", type=int, default=4_000_000, help="per domain")
    ap.add_argument("--heldout-chars", type=int, default=400_000, help="per domain")
    a = ap.parse_args()
    if not VIM_DOC.is_dir():
        raise SystemExit(f"{VIM_DOC} is missing: apt-get install vim-runtime")
    out = Path(a.out)
    for d in ("mixed/code", "mixed/prose", "heldout/code", "heldout/prose"):
        shutil.rmtree(out / d, ignore_errors=True)
        (out / d).mkdir(parents=True)
    code = stdlib_files()
    random.Random(0).shuffle(code)
    flat = lambda p: p.relative_to(stdlib_root()).as_posix().replace("/", "__")  # noqa: E731
    i = take(code, out / "mixed/code", a.train_chars, 0, flat)
    take(code, out / "heldout/code", a.heldout_chars, i, flat)
    prose = sorted(VIM_DOC.glob("*.txt"))
    random.Random(0).shuffle(prose)
    i = take(prose, out / "mixed/prose", a.train_chars, 0, lambda p: p.name)
    take(prose, out / "heldout/prose", a.heldout_chars, i, lambda p: p.name)
    for d in ("mixed/code", "mixed/prose", "heldout/code", "heldout/prose"):
        files = list((out / d).iterdir())
        print(f"{out / d}: {len(files)} files, {sum(f.stat().st_size for f in files):,} bytes")


if __name__ == "__main__":
    main()
