"""Why moelab tunes glibc's allocator on CPU: an out-of-place op on a 64 MiB tensor
(fresh memory, page-faulted in) against the same op in place, with glibc as it comes
and after `moelab.runtime.tune_cpu_allocator()`, in one process.

    python benchmarks/cpu_allocator.py [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moelab.runtime import tune_cpu_allocator


def ms(fn, n: int = 15) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    a, b = torch.randn(32768, 512), torch.randn(32768, 512)  # 64 MiB each, like N x D rows at 64x top-8
    rows = [("default", ms(lambda: a * b), ms(lambda: a.mul_(b)))]
    tune_cpu_allocator()
    rows.append(("tuned", ms(lambda: a * b), ms(lambda: a.mul_(b))))
    print("| malloc | a * b (new 64 MiB tensor), ms | a.mul_(b) (in place), ms |")
    print("|---|---:|---:|")
    for name, out, inplace in rows:
        print(f"| {name} | {out:.1f} | {inplace:.1f} |")


if __name__ == "__main__":
    main()
