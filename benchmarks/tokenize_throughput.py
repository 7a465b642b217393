"""`moelab tokenize` against the tokenizers library's own `encode_batch`, and its memory at
two corpus sizes (docs/benchmarks.md).

    python benchmarks/tokenize_throughput.py --sizes-mb 100,1000 --work /tmp/tokbench

The corpora are the standard library's source repeated to the size (said so in the
doc). Each `moelab tokenize` runs as its own process, so its wall time and peak resident
memory (the child's ru_maxrss) are its own. The baseline encodes the same documents
(200-line blocks of the 100 MB file) with `Tokenizer.encode_batch` in the same slices,
timing the encoding alone - an upper bound that excludes reading and writing. Finally
`moelab train` runs one step on the largest dataset, timed from process start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moelab.data.sources import LINES_PER_BLOCK, stdlib_files
from moelab.data.tokenizer import train_tokenizer


def make_corpus(path: Path, size: int, seed_text: str) -> None:
    if path.is_file() and path.stat().st_size >= size:
        return
    with open(path, "w") as f:
        written = 0
        while written < size:
            f.write(seed_text)
            written += len(seed_text.encode())


def run_timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes of the child, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024, err[-500:]


BASELINE = r"""
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
lines = open(sys.argv[2], encoding="utf-8").read().splitlines(keepends=True)
docs = ["".join(lines[i:i + %d]) for i in range(0, len(lines), %d)]
t0 = time.perf_counter(); n = 0; i = 0
while i < len(docs):
    j, size = i, 0
    while j < len(docs) and size < (4 << 20):
        size += len(docs[j]); j += 1
    n += sum(len(e.ids) for e in tok.encode_batch(docs[i:j], add_special_tokens=False)); i = j
print(time.perf_counter() - t0, n)
""" % (LINES_PER_BLOCK, LINES_PER_BLOCK)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="100,1000")
    ap.add_argument("--work", default="/tmp/moelab-tokbench")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    seed = "".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
    tok_file = work / "tokenizer.json"
    if not tok_file.is_file():
        train_tokenizer([seed], 4096, 10_000_000).save(str(tok_file))
    sizes = [int(s) for s in a.sizes_mb.split(",")]
    rows = []
    for mb in sizes:
        corpus = work / f"corpus-{mb}MB.txt"
        make_corpus(corpus, mb << 20, seed)
        out = work / f"ds-{mb}MB"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss, _ = run_timed([sys.executable, "-m", "moelab", "tokenize", str(corpus), "--out", str(out),
                                  "--tokenizer", str(tok_file), "--quiet"])
        m = json.loads((out / "manifest.json").read_text())
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        rows.append({"mb": mb, "bytes": corpus.stat().st_size, "wall_s": wall, "peak_rss": rss, "tokens": tokens})
    base_corpus = work / f"corpus-{sizes[0]}MB.txt"
    out = subprocess.run([sys.executable, "-c", BASELINE, str(tok_file), str(base_corpus)], capture_output=True,
                         text=True, check=True).stdout.split()
    base_s, base_tokens = float(out[0]), int(out[1])
    base_rate = base_corpus.stat().st_size / base_s / 1e6
    big = work / f"ds-{sizes[-1]}MB"
    train_s, train_rss, _ = run_timed([sys.executable, "-m", "moelab", "train", "tiny-moe", "--data", str(big),
                                       "--out", str(work / "run"), "--steps", "1", "--overwrite", "--quiet"])
    print(f"encode_batch alone ({sizes[0]} MB, {base_tokens:,} tokens): {base_s:.1f} s, {base_rate:.2f} MB/s")
    print("| corpus | tokens | moelab tokenize | MB/s | vs encode_batch | peak RSS |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = r["bytes"] / r["wall_s"] / 1e6
        print(f"| {r['mb']:,} MB | {r['tokens']:,} | {r['wall_s']:.1f} s | {rate:.2f} | {rate / base_rate:.2f}x | "
              f"{r['peak_rss'] / 2**20:,.0f} MiB |")
    print(f"peak RSS ratio {sizes[-1]} MB / {sizes[0]} MB: {rows[-1]['peak_rss'] / rows[0]['peak_rss']:.2f}")
    print(f"moelab train tiny-moe --data ds-{sizes[-1]}MB --steps 1, whole process: {train_s:.1f} s")


if __name__ == "__main__":
    main()
