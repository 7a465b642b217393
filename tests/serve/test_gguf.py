"""GGUF export checked by the real client: llama-cpp-python (llama.cpp built from source) loads each file
and must tokenize, score and continue held-out text as moelab does."""

import inspect
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import openai
import pytest
import torch
from llama_cpp import Llama
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import TINY, TINY_MOE, run_main
from moelab import ModelConfig, MoEConfig, Transformer
from moelab.cli import main
from moelab.convert.gguf import _QWEN2_SPLIT
from moelab.convert.io import import_hf, write_model_folder
from moelab.run_config import RunConfig
from moelab.serve.decode import decode
from moelab.store.run import load_run

LONG = ["model.max_seq_len=64", "data.seq_len=64"]
# text the runs never trained on: code, tabs, runs of spaces, accents, digits, a contraction
HELD_OUT = (
    'def parse(self, text):\n    return [x.strip() for x in text.split(",")]  # 42 items\n\n'
    "\tclass  Foo:   \n It's café naïve — 1234567 jumps!\n"
)
PROMPT = "the quick brown fox"


def corpus(root):
    fox = "".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}.\n" for i in range(800))
    path = root / "corpus.txt"
    path.write_text(fox + inspect.getsource(textwrap) * 3)
    return path


def llama(path, n_ctx=64) -> Llama:
    # llama.cpp keeps its KV cache in f16 unless told: parity of an f32 file is judged with an f32 cache
    f32 = 0  # GGML_TYPE_F32
    return Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, verbose=False, type_k=f32, type_v=f32)


def llama_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def built_run(root, name, cfg: ModelConfig, tokenizer_file, seed=0):
    """A run folder holding a model of `cfg` with substantial random weights and the trained tokenizer."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    run_cfg = RunConfig(name=name, model=cfg)
    run_cfg.data.seq_len = cfg.max_seq_len
    return write_model_folder(root / name, run_cfg, model, tokenizer_file, {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    data = corpus(root)
    rc = main(
        [
            "train",
            "tiny-moe",
            "--data",
            str(data),
            "--out",
            str(root / "moe"),
            "--steps",
            "30",
            "--quiet",
            *TINY_MOE,
            *LONG,
            "train.eval_every=30",
            "train.ckpt_every=30",
        ]
    )
    assert rc == 0
    dense = ["train", "tiny-dense", "--data", str(data), "--out", str(root / "dense"), "--steps", "30", "--quiet"]
    assert main([*dense, *TINY, *LONG, "train.eval_every=30", "train.ckpt_every=30"]) == 0
    tok = root / "moe" / "tokenizer.json"
    V = Tokenizer.from_file(str(tok)).get_vocab_size()
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    moe = dict(d_model=32, d_expert=32, n_experts=4, top_k=2)
    built = {
        "dense, tied (llama)": ModelConfig(**base, tie_embeddings=True),
        "dense, q/k/v biases (qwen2)": ModelConfig(**base, qkv_bias=True),
        "gated shared experts (qwen2moe)": ModelConfig(**base, moe=MoEConfig(
            **moe, n_shared_experts=1, d_shared=32, shared_gate=True, renormalize=False)),
        "per-head q/k norms (qwen3moe)": ModelConfig(**base, qk_norm="head", moe=MoEConfig(**moe)),
        "whole q/k norms, tied (olmoe)": ModelConfig(**{**base, "n_kv_heads": 4}, qk_norm="full", tie_embeddings=True,
                                                     moe=MoEConfig(**moe, renormalize=False)),
    }  # fmt: skip
    out = {"trained MoE (llama)": root / "moe", "trained dense (llama)": root / "dense"}
    for i, (name, cfg) in enumerate(built.items()):
        out[name] = built_run(root, f"b{i}", cfg, tok, seed=i)
    out["imported HF Qwen2-MoE (qwen2moe)"] = imported_qwen2_moe(root, data)
    return out


def imported_qwen2_moe(root, data):
    """An HF Qwen2-MoE folder as from the Hub (safetensors and a Qwen2-style tokenizer: its own split
    regex, NFC), made here, then `moelab import`-ed."""
    import transformers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [str(data)],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf_dir = root / "hf-qwen2moe"
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=416, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=1,
        tie_word_embeddings=False, eos_token_id=0)  # fmt: skip
    torch.manual_seed(5)
    hf = transformers.Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    hf.save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": None}))
    return import_hf(hf_dir, root / "imported")


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    files = {}
    for i, (name, run) in enumerate(runs.items()):
        for outtype in ("f32", "f16") if i < 2 else ("f32",):
            files[name, outtype] = root / f"{i}-{outtype}.gguf"
            assert (
                main(["export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(files[name, outtype])])
                == 0
            )
    return files


@pytest.mark.parametrize(
    "name",
    [
        "trained MoE (llama)",
        "trained dense (llama)",
        "dense, tied (llama)",
        "dense, q/k/v biases (qwen2)",
        "gated shared experts (qwen2moe)",
        "per-head q/k norms (qwen3moe)",
        "whole q/k norms, tied (olmoe)",
        "imported HF Qwen2-MoE (qwen2moe)",
    ],
)
def test_llama_cpp_tokenizes_scores_and_continues_as_moelab(runs, exported, name):
    r = load_run(runs[name], device="cpu")
    ids = r.need_tokenizer().encode(HELD_OUT, add_special_tokens=False).ids
    scored = ids[:48]  # within the 64-token context
    with torch.no_grad():
        ref = r.model(torch.tensor([scored])).logits[0].numpy()
    for (n, outtype), path in exported.items():
        if n != name:
            continue
        llm = llama(path)
        try:
            assert llm.tokenize(HELD_OUT.encode(), add_bos=False, special=False) == ids
            got = llama_logits(llm, scored)
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            assert rel <= (1e-3 if outtype == "f32" else 1e-2), (outtype, rel)
            if outtype == "f32":  # greedy: 32 new tokens, or fewer where both stop at the end-of-text token
                prompt = r.need_tokenizer().encode(PROMPT, add_special_tokens=False).ids
                eos = r.need_tokenizer().token_to_id("<|endoftext|>")
                ours = decode(r.model, [prompt], 32, eos=eos)[0].tokens
                theirs = []
                for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                    if t == eos or len(theirs) == 32:
                        break
                    theirs.append(t)
                assert theirs == ours
        finally:
            llm.close()


def test_q8_0_scores_held_out_text_within_one_percent(runs, tmp_path):
    out = tmp_path / "q8.gguf"
    assert (
        main(["export", str(runs["trained MoE (llama)"]), "--format", "gguf", "--outtype", "q8_0", "--out", str(out)])
        == 0
    )
    r = load_run(runs["trained MoE (llama)"], device="cpu")
    text = "line 5: the quick brown fox 5 jumps over the lazy dog 5.\nline 6: the quick brown fox 6 jumps over"
    ids = r.need_tokenizer().encode(text, add_special_tokens=False).ids[:64]
    with torch.no_grad():
        ours = float(r.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).lm_loss)
    llm = llama(out)
    try:
        logits = torch.from_numpy(llama_logits(llm, ids[:-1]))
    finally:
        llm.close()
    theirs = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))
    assert abs(theirs - ours) <= 0.01 * ours, (theirs, ours)
    f32 = tmp_path / "f32.gguf"
    assert main(["export", str(runs["trained MoE (llama)"]), "--format", "gguf", "--out", str(f32)]) == 0
    assert out.stat().st_size < 0.45 * f32.stat().st_size  # 8.5 bits a weight where rows allow it


def test_openai_client_gets_moelab_greedy_text_from_the_llama_cpp_server(runs, exported):
    name = "trained MoE (llama)"
    r = load_run(runs[name], device="cpu")
    tok = r.need_tokenizer()
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    want = tok.decode(decode(r.model, [ids], 16, eos=tok.token_to_id("<|endoftext|>"))[0].tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(exported[name, "f32"]), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "64", "--n_threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        deadline = time.monotonic() + 300  # a start-up, not a judged duration: a slow host only waits longer
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.5)
        done = client.completions.create(
            model="moelab",
            prompt=PROMPT,
            max_tokens=16,
            temperature=0.0,
            extra_body={"repeat_penalty": 1.0, "top_k": 1},
        )
        assert done.choices[0].text == want
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_what_no_gguf_architecture_computes_is_refused_and_nothing_is_written(runs, tmp_path, capsys):
    tok = runs["trained MoE (llama)"] / "tokenizer.json"
    base = dict(vocab_size=600, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    moe = dict(d_model=32, d_expert=32, n_experts=4, top_k=2)
    cases = {
        "sigmoid": ModelConfig(**base, moe=MoEConfig(**moe, router="sigmoid")),
        "renormalize=True, but llama.cpp's qwen2moe never": ModelConfig(**base, moe=MoEConfig(
            **moe, n_shared_experts=1, shared_gate=True)),
        "MoE on some layers only": ModelConfig(**base, moe=MoEConfig(**moe), moe_pattern="alternate"),
        "eval_capacity_factor": ModelConfig(**base, moe=MoEConfig(**moe, eval_capacity_factor=1.0)),
        "llama.cpp's olmoe sizes its k norm": ModelConfig(**base, n_kv_heads=2, qk_norm="full",
                                                         moe=MoEConfig(**moe, renormalize=False)),
    }  # fmt: skip
    for i, (why, cfg) in enumerate(cases.items()):
        run = built_run(tmp_path, f"r{i}", cfg, tok)
        rc, _, err = run_main(
            capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf"), check=False
        )
        assert rc == 2 and len(err.strip().splitlines()) == 1 and why in err, err
        assert not list(tmp_path.glob("*x.gguf*"))


def test_bad_input_is_one_line_and_a_full_disk_leaves_nothing(runs, tmp_path, capsys):
    run = runs["trained MoE (llama)"]
    for args, expect in [
        (
            ["export", str(tmp_path / "missing"), "--format", "gguf", "--out", str(tmp_path / "a.gguf")],
            "does not exist",
        ),
        (["export", str(run), "--format", "gguf", "--out", str(run / "a.gguf")], "inside the input"),
        (["export", str(run), "--format", "gguf", "--out", str(tmp_path)], "is a folder"),
        (["export", str(run), "--format", "hf", "--outtype", "f16", "--out", str(tmp_path / "hf")], "--outtype f16"),
    ]:
        rc, _, err = run_main(capsys, *args, check=False)
        assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moelab",
            "export",
            str(run),
            "--format",
            "gguf",
            "--outtype",
            "q4",
            "--out",
            str(tmp_path / "b.gguf"),
        ],
        capture_output=True,
        text=True,
    ).returncode
    assert rc == 2
    (tmp_path / "notes.gguf").write_bytes(b"my notes")  # --overwrite replaces a GGUF file, nothing else
    rc, _, err = run_main(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "notes.gguf"),
                          "--overwrite", check=False)  # fmt: skip
    assert rc == 2 and "does not start with b'GGUF'" in err and (tmp_path / "notes.gguf").read_bytes() == b"my notes"
    earlier = b"GGUF" + b"\0" * 60  # an earlier export (its header is all --overwrite looks at)
    (tmp_path / "earlier.gguf").write_bytes(earlier)

    def small_disk():  # writes past 64 KiB fail as on a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))

    for out, extra in (("new.gguf", []), ("earlier.gguf", ["--overwrite"])):
        r = subprocess.run([sys.executable, "-m", "moelab", "export", str(run), "--format", "gguf", "--out",
                            str(tmp_path / out), *extra], capture_output=True, text=True, preexec_fn=small_disk,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and str(tmp_path / out) in lines[0], r.stderr[-2000:]
        assert "too large" in lines[0].lower()
    assert not (tmp_path / "new.gguf").exists() and (tmp_path / "earlier.gguf").read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_killed_exports_staged_file_is_removed_by_the_next_export(runs, tmp_path):
    from moelab.store.outputs import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".m.gguf.tmp-{_HOST}-{int(dead.stdout)}"  # what a kill -9 mid-write leaves
    stale.write_bytes(b"GGUF half")
    assert main(["export", str(runs["trained MoE (llama)"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
