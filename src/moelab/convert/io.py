"""`moelab import` / `moelab export`: folders on disk, safetensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from ..config import ConfigError
from ..data.chat import copy_tokenizer_extras, load_chat_format
from ..model import Transformer
from ..run_config import RunConfig, save_config
from ..store.checkpoint import save_checkpoint
from ..store.outputs import check_output, staged_output, write_safetensors
from .hf import ARCHS, choose_arch, config_from_hf, config_to_hf, key_pairs

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / s for s in shards]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(hf_dir.glob("pytorch_model*.bin")) or list(hf_dir.glob("*.pt")):
        raise ConfigError(
            f"{hf_dir}: only pickle weights (pytorch_model.bin). Loading them would run arbitrary "
            "code from the file, so moelab refuses. Convert them where you trust the source: "
            "model = AutoModelForCausalLM.from_pretrained(dir); "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ConfigError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def read_hf(hf_dir: str | Path) -> tuple[Transformer, str]:
    """A moelab Transformer with the weights of a local HF folder, and its model_type."""
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        if (hf_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{hf_dir}: this is a moelab run folder, not a Hugging Face one; use it directly "
                "(train --init, eval, export)"
            )
        raise ConfigError(f"{hf_dir}: config.json is missing (expected a Hugging Face model folder)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    cfg, arch = config_from_hf(hf_cfg)
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(hf_dir):
        if not f.is_file():
            raise ConfigError(f"{hf_dir}: weight file {f.name} (named by the index) is missing")
        try:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
    model = Transformer(cfg)
    state = model.state_dict()
    used = set()
    for hf_key, key, expert in key_pairs(cfg, arch):
        if hf_key not in tensors:  # every weight comes from the file: nothing stays at its random init
            hint = " (config.json says tie_word_embeddings=false)" if hf_key == "lm_head.weight" else ""
            raise ConfigError(f"{hf_dir}: weight {hf_key} is missing{hint}")
        t = tensors[hf_key].to(torch.float32)
        target = state[key] if expert is None else state[key][expert]
        if t.shape != target.shape:
            raise ConfigError(f"{hf_dir}: {hf_key} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        target.copy_(t)
        used.add(hf_key)
    extra = [k for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if "lm_head.weight" in extra and cfg.tie_embeddings:
        extra.remove("lm_head.weight")
    if extra:
        raise ConfigError(f"{hf_dir}: weights moelab would not use (unsupported feature?): {extra[:6]}")
    model.load_state_dict(state)
    return model, arch.model_type


def write_model_folder(out: Path, cfg: RunConfig, model: Transformer, tokenizer_file: Path | None, note: dict) -> Path:
    """A run folder holding only step 0: what `train --init`, eval, generate, export read."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        shutil.copy(tokenizer_file, out / "tokenizer.json")
    save_checkpoint(out / "checkpoints", 0, model, None, note)
    return out


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a moelab run folder (config, tokenizer, checkpoint step 0) from an HF folder.
    `out` must be new or empty unless `overwrite`; it appears only when complete."""
    hf_dir = Path(hf_dir)
    check_output(out, overwrite=overwrite, protect=[hf_dir], kind="run")
    model, mt = read_hf(hf_dir)
    cfg = RunConfig(name=f"{hf_dir.name}-{mt}", model=model.cfg)
    cfg.data.seq_len = min(cfg.data.seq_len, model.cfg.max_seq_len)
    with staged_output(out, overwrite=overwrite, protect=[hf_dir], kind="run") as tmp:
        write_model_folder(tmp, cfg, model, hf_dir / "tokenizer.json", {"source": str(hf_dir), "model_type": mt})
        copy_tokenizer_extras(hf_dir, tmp)  # chat template and special tokens, for fine-tuning and export
    return Path(out)


def export_hf(model: Transformer, out: str | Path, tokenizer_file: Path | None = None, arch: str | None = None) -> Path:
    """Write an HF folder that `AutoModelForCausalLM.from_pretrained` loads: config.json,
    per-expert safetensors keys, tokenizer files and generation_config.json."""
    cfg, out = model.cfg, Path(out)
    auto = choose_arch(cfg, model)
    arch = arch or auto
    if arch not in ARCHS:
        raise ConfigError(f"--arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if arch != auto and (bool(ARCHS[arch].moe) != bool(ARCHS[auto].moe) or ARCHS[arch].qk_norm != cfg.qk_norm):
        raise ConfigError(f"--arch {arch}: this model needs {auto} (features differ)")
    out.mkdir(parents=True, exist_ok=True)
    eos = pad = None
    if tokenizer_file is not None and tokenizer_file.is_file():
        tok = Tokenizer.from_file(str(tokenizer_file))
        shutil.copy(tokenizer_file, out / "tokenizer.json")
        src_cfg = tokenizer_file.parent / "tokenizer_config.json"
        if src_cfg.is_file():  # imported: hand back the source's own config and chat template
            copy_tokenizer_extras(tokenizer_file.parent, out)
            fmt = load_chat_format(tokenizer_file.parent)
            pad_token = dict(fmt.special).get("pad_token")
            eos, pad = tok.token_to_id(fmt.eos_token), tok.token_to_id(pad_token) if pad_token else None
        else:
            eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
            (out / "tokenizer_config.json").write_text(
                json.dumps(
                    {
                        "tokenizer_class": "PreTrainedTokenizerFast",
                        "eos_token": "<|endoftext|>",
                        "pad_token": "<|pad|>",
                        "model_max_length": cfg.max_seq_len,
                        "clean_up_tokenization_spaces": False,
                    },
                    indent=1,
                )
            )
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, arch, eos, pad), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": pad}, indent=1))
    state = model.state_dict()
    tensors = {}
    hf_arch = ARCHS[arch]
    for hf_key, key, e in key_pairs(cfg, hf_arch):
        t = state[key] if e is None else state[key][e]
        tensors[hf_key] = t.detach().to(torch.float32).contiguous().clone()
    if arch == "qwen2" and not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: zeros compute the same
        for i in range(cfg.n_layers):
            for p, dim in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
                tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.zeros(dim * cfg.head_dim)
    write_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
