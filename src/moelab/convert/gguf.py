"""`moelab export --format gguf`: a file llama.cpp runs with the logits moelab computes.

The architecture is the GGUF one whose arithmetic equals the model's, and llama.cpp fixes
some of it per architecture rather than reading it from the file:
- llama (dense, and Mixtral-style MoE): top-k weights renormalised; rotary pairs interleaved,
  so q/k rows are permuted from moelab's rotate-half layout (as llama.cpp's own converter does);
- qwen2 (dense with q/k/v biases), qwen3moe (per-head q/k norms, renormalised), qwen2moe
  (gated shared experts, *not* renormalised), olmoe (whole-vector q/k norms, not renormalised,
  an untied head): rotate-half rotary, weights as they are.
What no architecture computes is refused by name (sigmoid routers, balancing biases, capacity
at inference, MoE on some layers only, ...): a file that runs but disagrees is never written.

The tokenizer goes in as llama.cpp's "gpt2" BPE with the pre-tokenizer that splits text the
way the run's tokenizer.json does ("gpt-2" for moelab's byte-level BPE); one llama.cpp does
not implement identically is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..model import Transformer
from ..store.outputs import probe_write
from .hf import choose_arch

OUTTYPES = ("f32", "f16", "q8_0")

# the Hugging Face target choose_arch picks -> the GGUF architecture that computes the same
GGUF_ARCH = {
    "llama": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "olmoe": "olmoe",
}
RENORMALISES = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
NEEDS_HEAD = ("qwen2moe", "olmoe")  # no fallback to the tied embedding

# pre-tokenizer regexes of tokenizer.json -> llama.cpp's name for the same split
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _CONTRACTIONS + r"\p{N}" + _REST
_LLAMA3_SPLIT = _CONTRACTIONS + r"\p{N}{1,3}" + _REST
SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def gguf_arch(model: Transformer) -> str:
    """The GGUF architecture that computes exactly this model, or a ConfigError naming what none computes."""
    cfg = model.cfg
    m = cfg.moe if cfg.n_moe_layers else None
    if m is not None and (cfg.moe_pattern != "all" or cfg.first_dense):
        raise ConfigError(
            f"--format gguf: MoE on some layers only (model.moe_pattern={cfg.moe_pattern}, "
            f"model.first_dense={cfg.first_dense}): llama.cpp's MoE architectures make every layer MoE"
        )
    if m is not None and m.router_override != "none":
        raise ConfigError(f"--format gguf: model.moe.router_override={m.router_override} is a measurement aid")
    try:
        arch = GGUF_ARCH[choose_arch(cfg, model)]
    except ConfigError as e:  # the same features, said for this format
        raise ConfigError(str(e).replace("export: ", "--format gguf: ", 1).split("; use --arch")[0]) from None
    if m is not None and m.renormalize != RENORMALISES[arch]:
        raise ConfigError(
            f"--format gguf: model.moe.renormalize={m.renormalize}, but llama.cpp's {arch} "
            f"{'always' if RENORMALISES[arch] else 'never'} renormalises the top-k weights"
        )
    if arch == "olmoe" and cfg.kv_heads != cfg.n_heads:
        raise ConfigError(
            f"--format gguf: whole-vector k norms with grouped-query attention (model.n_kv_heads={cfg.kv_heads} < "
            f"n_heads={cfg.n_heads}): llama.cpp's olmoe sizes its k norm for n_heads"
        )
    return arch


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from rotate-half to llama.cpp's interleaved rotary pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 tensor in moelab's (out, in) layout, which GGUF stores as it is."""
    cfg, state = model.cfg, {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["norm.weight"]}
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    elif arch in NEEDS_HEAD:  # a tied head written twice computes the same
        out["output.weight"] = state["embed.weight"]
    names = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
             "attn.wo.weight": "attn_output.weight", "attn.q_norm.weight": "attn_q_norm.weight",
             "attn.k_norm.weight": "attn_k_norm.weight", "ffn.w_gate": "ffn_gate.weight", "ffn.w_up": "ffn_up.weight",
             "ffn.w_down": "ffn_down.weight", "ffn.router.weight": "ffn_gate_inp.weight",
             "ffn.experts.w_gate": "ffn_gate_exps.weight", "ffn.experts.w_up": "ffn_up_exps.weight",
             "ffn.experts.w_down": "ffn_down_exps.weight", "ffn.shared.w_gate": "ffn_gate_shexp.weight",
             "ffn.shared.w_up": "ffn_up_shexp.weight", "ffn.shared.w_down": "ffn_down_shexp.weight",
             "ffn.shared.gate.weight": "ffn_gate_inp_shexp.weight"}  # fmt: skip
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        for p, heads in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", 0)):
            for kind in ("weight", "bias"):
                t = state.get(f"{pre}attn.w{p}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and heads:
                    t = _permute_rotary(t, heads)
                out[f"blk.{i}.attn_{p}.{kind}"] = t
        for ours, theirs in names.items():
            if pre + ours in state:
                t = state[pre + ours]
                out[f"blk.{i}.{theirs}"] = t.reshape(-1) if ours == "ffn.shared.gate.weight" else t
    return out


def _encode(t: torch.Tensor, name: str, outtype: str):
    """(numpy data, its GGML type or None for the dtype itself): 1-D tensors and routers stay f32 - routing
    is a top-k of nearly tied scores; q8_0 needs rows of 32, else the tensor goes f16."""
    import gguf

    a = t.contiguous().numpy()
    if outtype == "f32" or a.ndim == 1 or "gate_inp" in name:
        return a.astype(np.float32), None
    if outtype == "q8_0" and a.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(a.astype(np.float32), q8), q8
    return a.astype(np.float16), None


def _pre_tokenizer(spec: dict | None, where: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer, or a ConfigError."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            name = SPLITS.get(parts[0].get("pattern", {}).get("Regex", ""))
            if name:
                return name
    raise ConfigError(
        f"--format gguf: {where}'s pre-tokenizer ({json.dumps(spec)[:120]}) splits text in a way llama.cpp "
        "implements under no name moelab knows (gpt-2, qwen2, llama-bpe); token ids would differ"
    )


def add_tokenizer(writer, tokenizer_file: Path, n_vocab: int) -> None:
    """The run's byte-level BPE as llama.cpp's "gpt2" tokenizer: tokens padded to the model's vocabulary,
    merges, special tokens, end-of-text and pad ids, and the chat template when the run has one."""
    import gguf

    tj = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") not in ("ByteLevel", None):
        raise ConfigError(f"--format gguf: {tokenizer_file} is not a byte-level BPE tokenizer (llama.cpp's gpt2)")
    pre = _pre_tokenizer(tj.get("pre_tokenizer"), tokenizer_file)
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    ids = {**{i: s for s, i in model["vocab"].items()}, **{i: a["content"] for i, a in added.items()}}
    size = max(ids) + 1
    if size > n_vocab:
        raise ConfigError(f"--format gguf: the tokenizer has {size} tokens, the model's embedding {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(ids[i])
        a = added.get(i)
        types.append(
            gguf.TokenType.NORMAL
            if a is None
            else gguf.TokenType.CONTROL
            if a.get("special")
            else gguf.TokenType.USER_DEFINED
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos_name, pad_name, template = "<|endoftext|>", "<|pad|>", None
    cfg_file = tokenizer_file.parent / "tokenizer_config.json"
    if cfg_file.is_file():  # an imported run keeps its source's special tokens and chat template
        tc = json.loads(cfg_file.read_text(encoding="utf-8"))
        token = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        eos_name, pad_name = token(tc.get("eos_token")) or eos_name, token(tc.get("pad_token")) or pad_name
        template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
    index = {s: i for i, s in enumerate(tokens)}
    if eos_name in index:
        writer.add_eos_token_id(index[eos_name])
        writer.add_bos_token_id(index[eos_name])  # GPT-2's convention; never added (below)
    if pad_name in index:
        writer.add_pad_token_id(index[pad_name])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)


def write_gguf(
    model: Transformer, tokenizer_file: Path | None, path: Path, outtype: str = "f32", name: str = ""
) -> str:
    """Write `model` as one GGUF file at `path` (the caller stages it); returns the GGUF architecture."""
    import gguf

    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype: expected one of {list(OUTTYPES)}, got {outtype!r}")
    if tokenizer_file is None or not tokenizer_file.is_file():
        raise ConfigError("--format gguf: the run has no tokenizer.json, and a GGUF file carries its tokenizer")
    cfg = model.cfg
    arch = gguf_arch(model)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or "moelab")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])  # fmt: skip
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    m = cfg.moe if cfg.n_moe_layers else None
    # llama's and olmoe's MoE read their experts' width from feed_forward_length
    w.add_feed_forward_length(m.d_expert if m is not None and arch in ("llama", "olmoe") else cfg.d_ff)
    if m is not None:
        w.add_expert_count(m.n_experts)
        w.add_expert_used_count(m.top_k)
        w.add_expert_feed_forward_length(m.d_expert)
        if m.n_shared_experts:
            w.add_expert_shared_feed_forward_length(m.d_shared_total)
    add_tokenizer(w, tokenizer_file, cfg.vocab_size)
    for key, t in gguf_tensors(model, arch).items():
        data, raw = _encode(t, key, outtype)
        w.add_tensor(key, data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except OSError as e:  # numpy's tofile reports a full disk without errno: one more write says why
        reason = probe_write(path) if e.errno is None else e
        if reason is None:
            raise
        reason.filename = str(path)
        raise reason from None
    return arch
