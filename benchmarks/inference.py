"""Decoding an MoE against its dense twin (equal active parameters) and its dense total twin (equal total
parameters): in moelab (KV cache, batch 1 and 8, and without the cache as the reference) and in llama.cpp
through llama-cpp-python (GGUF f32, f16, q8_0, batch 1), side by side in one run, one thread.

moelab's figures come from `moelab.serve.bench` (what `moelab bench-infer` prints): each model decodes from a
one-token prompt to its full context; models in turn within a round; median of rounds. llama.cpp's: the same
three models written as GGUF with `moelab export`'s writer and a tokenizer trained here (its values do not
change the speed), greedy decoding of the same number of tokens (5 times a round), median of rounds. Weights are random: decode
speed does not depend on their values, only an MoE's routing does (near uniform at initialisation).

    python benchmarks/inference.py [--recipe tiny-moe] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moelab import Transformer
from moelab.convert.gguf import write_gguf
from moelab.data.tokenizer import train_tokenizer
from moelab.run_config import load_config
from moelab.runtime import machine_name, set_cpu_threads
from moelab.serve.bench import bench_inference, format_report, twins
from moelab.store.outputs import save_tokenizer


def llama_cpp_rows(models, tok_file: Path, work: Path, rounds: int, threads: int) -> list[tuple[str, str, float, int]]:
    """(model, outtype, decode tokens/s at batch 1, file bytes) for each model and GGUF type."""
    from llama_cpp import Llama

    rows = []
    for name, model in models:
        for outtype in ("f32", "f16", "q8_0"):
            path = work / f"{name.replace(' ', '-')}-{outtype}.gguf"
            write_gguf(model, tok_file, path, outtype)
            n = model.cfg.max_seq_len - 1
            llm = Llama(str(path), n_ctx=model.cfg.max_seq_len, n_threads=threads, n_batch=64, verbose=False)
            seconds = []
            for _ in range(rounds + 1):  # the first is a warm-up; a round decodes the context 5 times (ms each)
                t = time.perf_counter()
                for _ in range(5):
                    for i, _tok in enumerate(llm.generate([1], temp=0.0, top_k=1, top_p=1.0, min_p=0.0)):
                        if i + 1 == n:
                            break
                seconds.append((time.perf_counter() - t) / 5)
            llm.close()
            rows.append((name, outtype, n / statistics.median(seconds[1:]), path.stat().st_size))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny-moe")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="1,8")
    args = ap.parse_args()
    set_cpu_threads(args.threads, "--threads")
    torch.manual_seed(0)
    cfg = load_config(args.recipe, []).model
    models = [(label, Transformer(c).eval()) for label, c in twins(cfg)]
    rep = bench_inference(models, [int(b) for b in args.batch.split(",")], args.rounds, uncached=True,
                          machine=machine_name(torch.device("cpu")))  # fmt: skip
    print(f"## {args.recipe}: moelab (PyTorch {torch.__version__})\n")
    print(format_report(rep))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = inspect.getsource(inspect) * 4  # any text: the tokenizer's values do not change the speed
        tok_file = work / "tokenizer.json"
        save_tokenizer(train_tokenizer([text], cfg.vocab_size, 10**7), tok_file)
        rows = llama_cpp_rows(models, tok_file, work, args.rounds, args.threads)
    print(f"\n## {args.recipe}: llama.cpp (llama-cpp-python), batch 1, {args.threads} thread(s)\n")
    print("model | GGUF | decode tok/s | file MiB")
    by = {}
    for name, outtype, tps, size in rows:
        by[name, outtype] = tps
        print(f"{name} | {outtype} | {tps:,.0f} | {size / 2**20:.1f}")
    if ("dense twin", "f32") in by:
        for outtype in ("f32", "f16", "q8_0"):
            m = by["model", outtype]
            print(f"{outtype}: the MoE at {m / by['dense twin', outtype]:.2f}x its dense twin's tokens/s and "
                  f"{m / by['dense total twin', outtype]:.2f}x its dense total twin's")  # fmt: skip


if __name__ == "__main__":
    main()
