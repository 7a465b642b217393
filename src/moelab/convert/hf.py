"""Hugging Face checkpoints <-> moelab, with key mappings as data.

One table of key templates per architecture: `{i}` is a layer, `{e}` an expert. Expert
templates map one HF tensor per expert onto a row of moelab's 3-D expert tensors.
Supported: llama, mistral, qwen2 (dense); mixtral, qwen2_moe, qwen3_moe, olmoe (MoE).
Anything a config asks for that moelab cannot compute (sliding windows, rope scaling,
clipped qkv, biases where unsupported, other activations) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, ModelConfig, MoEConfig

ATTN = [
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
]
QKV_BIAS = [(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"layers.{{i}}.attn.w{p}.bias") for p in "qkv"]
QK_NORM = [
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
]
DENSE_MLP = [
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.w_gate"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.w_up"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.w_down"),
]
QWEN_EXPERTS = [
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.ffn.experts.w_gate"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.ffn.experts.w_up"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers.{i}.ffn.experts.w_down"),
]
MIXTRAL_EXPERTS = [
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.ffn.router.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "layers.{i}.ffn.experts.w_gate"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "layers.{i}.ffn.experts.w_up"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "layers.{i}.ffn.experts.w_down"),
]
SHARED = [
    ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "layers.{i}.ffn.shared.w_gate"),
    ("model.layers.{i}.mlp.shared_expert.up_proj.weight", "layers.{i}.ffn.shared.w_up"),
    ("model.layers.{i}.mlp.shared_expert.down_proj.weight", "layers.{i}.ffn.shared.w_down"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared.gate.weight"),
]


@dataclass(frozen=True)
class Arch:
    """One Hugging Face architecture moelab reads and writes: model_type, the transformers class, its key templates (MoE
    and shared-expert keys), q/k/v bias and q/k-norm layout, and MoE config field names."""

    model_type: str
    hf_class: str
    moe: tuple = ()
    shared: tuple = ()
    qkv_bias: bool = False
    qk_norm: str = "none"
    moe_fields: dict = field(default_factory=dict)  # moelab MoE field -> HF config key


ARCHS = {
    "llama": Arch("llama", "LlamaForCausalLM"),
    "mistral": Arch("mistral", "MistralForCausalLM"),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    "mixtral": Arch(
        "mixtral",
        "MixtralForCausalLM",
        moe=tuple(MIXTRAL_EXPERTS),
        moe_fields={"n_experts": "num_local_experts", "d_expert": "intermediate_size"},
    ),
    "qwen2_moe": Arch(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        moe=tuple(QWEN_EXPERTS),
        shared=tuple(SHARED),
        qkv_bias=True,
        moe_fields={"n_experts": "num_experts", "d_expert": "moe_intermediate_size"},
    ),
    "qwen3_moe": Arch(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        moe=tuple(QWEN_EXPERTS),
        qk_norm="head",
        moe_fields={"n_experts": "num_experts", "d_expert": "moe_intermediate_size"},
    ),
    "olmoe": Arch(
        "olmoe",
        "OlmoeForCausalLM",
        moe=tuple(QWEN_EXPERTS),
        qk_norm="full",
        moe_fields={"n_experts": "num_experts", "d_expert": "intermediate_size"},
    ),
}


def key_pairs(cfg: ModelConfig, arch: Arch) -> list[tuple[str, str, int | None]]:
    """(hf_key, moelab_key, expert index or None) for every tensor of this model."""
    pairs: list[tuple[str, str, int | None]] = [
        ("model.embed_tokens.weight", "embed.weight", None),
        ("model.norm.weight", "norm.weight", None),
    ]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", None))
    for i in range(cfg.n_layers):
        layer = ATTN + (QKV_BIAS if cfg.qkv_bias else []) + (QK_NORM if cfg.qk_norm != "none" else [])
        if cfg.moe is not None and cfg.is_moe_layer(i):
            experts = [t for t in arch.moe if "{e}" in t[0]]
            layer = layer + [t for t in arch.moe if "{e}" not in t[0]]
            if cfg.moe.n_shared_experts:
                layer = layer + [t for t in arch.shared if "gate.weight" not in t[0] or cfg.moe.shared_gate]
            for e in range(cfg.moe.n_experts):
                pairs += [(h.format(i=i, e=e), m.format(i=i), e) for h, m in experts]
        else:
            layer = layer + DENSE_MLP
        pairs += [(h.format(i=i), m.format(i=i), None) for h, m in layer]
    return pairs


# ------------------------------------------------------------------ HF config -> moelab
def _refuse(model_type: str, what: str) -> ConfigError:
    return ConfigError(
        f"{model_type}: {what} is not supported by moelab; refusing rather than converting "
        "to a model that computes something else"
    )


def _rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for rope_type in (rp.get("rope_type"), scaling.get("rope_type", scaling.get("type"))):
        if rope_type not in (None, "default"):
            raise _refuse(d["model_type"], f"rope scaling '{rope_type}'")
    return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))


def _layer_pattern(d: dict, n_layers: int) -> tuple[str, int]:
    step = d.get("decoder_sparse_step", 1) or 1
    mlp_only = sorted(d.get("mlp_only_layers") or [])
    first = len(mlp_only)
    if mlp_only != list(range(first)):
        raise _refuse(d["model_type"], f"mlp_only_layers={mlp_only} (only a leading run of dense layers)")
    if step == 1:
        return "all", first
    if step == 2:
        return "alternate", first
    raise _refuse(d["model_type"], f"decoder_sparse_step={step}")


def config_from_hf(d: dict) -> tuple[ModelConfig, Arch]:
    """A ModelConfig from a Hugging Face config.json mapping, and its architecture entry.
    Raises ConfigError naming an unsupported feature or a missing or ill-typed field."""
    try:
        return _config_from_hf(d)
    except KeyError as e:
        raise ConfigError(f"config.json ({d.get('model_type')}): required field {e} is missing") from None
    except (TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"config.json ({d.get('model_type')}): a field has the wrong type or value ({e})") from None


def _config_from_hf(d: dict) -> tuple[ModelConfig, Arch]:
    mt = d.get("model_type")
    if mt not in ARCHS:
        raise ConfigError(f"config.json: model_type {mt!r} is not supported; moelab imports {sorted(ARCHS)}")
    arch = ARCHS[mt]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(mt, f"hidden_act '{act}'")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key) and not (key == "attention_bias" and arch.qkv_bias):
            raise _refuse(mt, key)
    if d.get("sliding_window") and (mt == "mistral" or d.get("use_sliding_window")):
        raise _refuse(mt, f"sliding-window attention (sliding_window={d['sliding_window']})")
    if d.get("clip_qkv"):
        raise _refuse(mt, f"clip_qkv={d['clip_qkv']}")
    D, H = d["hidden_size"], d["num_attention_heads"]
    if d.get("head_dim") not in (None, D // H):
        raise _refuse(mt, f"head_dim={d['head_dim']} != hidden_size / num_attention_heads")
    moe, pattern, first = None, "all", 0
    if arch.moe:
        f = arch.moe_fields
        k = d["num_experts_per_tok"]
        shared = d.get("shared_expert_intermediate_size") or 0 if mt == "qwen2_moe" else 0
        # transformers renamed num_experts -> num_local_experts for some models; read either
        n_exp = next((d[key] for key in (f["n_experts"], "num_local_experts", "num_experts") if d.get(key)), None)
        if n_exp is None:
            raise ConfigError(f"config.json ({mt}): no num_experts / num_local_experts")
        moe = MoEConfig(
            d_model=D,
            d_expert=d[f["d_expert"]],
            n_experts=n_exp,
            top_k=k,
            renormalize=bool(d.get("norm_topk_prob", mt == "mixtral")),
            n_shared_experts=1 if shared else 0,
            d_shared=shared or None,
            shared_gate=bool(shared),
            jitter=float(d.get("router_jitter_noise", 0.0) or 0.0),
            lb_coef=float(d.get("router_aux_loss_coef", 0.01)) * k,
            z_coef=0.0,
        )
        pattern, first = _layer_pattern(d, d["num_hidden_layers"])
    cfg = ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=D,
        n_layers=d["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H,
        d_ff=d.get("intermediate_size", 4 * D),
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(d),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qk_norm=arch.qk_norm,  # type: ignore[arg-type]  # ARCHS holds only valid names
        qkv_bias=bool(d.get("qkv_bias", True)) if mt == "qwen2_moe" else arch.qkv_bias,
        moe=moe,
        moe_pattern=pattern if moe else "none",  # type: ignore[arg-type]  # _layer_pattern returns all|alternate
        first_dense=first,
    )
    return cfg, arch


# ------------------------------------------------------------------ moelab -> HF config
def choose_arch(cfg: ModelConfig, model=None) -> str:
    """The HF architecture that computes exactly this model, or a ConfigError naming the
    feature that no target can express."""
    if cfg.moe is None or cfg.n_moe_layers == 0:
        if cfg.qk_norm != "none":
            raise ConfigError(f"export: q/k norms ({cfg.qk_norm}) in a dense model: no supported dense target")
        return "qwen2" if cfg.qkv_bias else "llama"
    m = cfg.moe
    if m.router != "softmax":
        raise ConfigError(
            f"export: router 'sigmoid' has no Hugging Face target among {sorted(a for a in ARCHS if ARCHS[a].moe)}"
        )
    if m.eval_capacity_factor is not None:
        raise ConfigError("export: eval_capacity_factor drops tokens at inference; HF MoE blocks are dropless")
    if model is not None and any(
        r.router.bias is not None and r.router.bias.abs().sum() > 0 for r in model.moe_layers()
    ):
        raise ConfigError(
            "export: aux-loss-free balancing biases (router.bias) change expert choice and "
            "no HF target among these architectures reads them"
        )
    all_moe = cfg.moe_pattern == "all" and cfg.first_dense == 0
    if m.n_shared_experts:
        if not m.shared_gate:
            raise ConfigError("export: shared experts without a gate (Qwen2-MoE always gates them)")
        if cfg.qk_norm != "none":
            raise ConfigError("export: shared experts together with q/k norms: no supported target")
        return "qwen2_moe"
    if cfg.qkv_bias:
        raise ConfigError("export: q/k/v biases in an MoE without shared experts: no supported target")
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.qk_norm == "full":
        if not all_moe:
            raise ConfigError("export: OLMoE layout needs every layer to be MoE")
        return "olmoe"
    if m.renormalize and all_moe:
        return "mixtral"
    raise ConfigError(
        "export: an MoE without q/k norms needs renormalised top-k weights and MoE in every "
        "layer (Mixtral); use --arch or change the model"
    )


def config_to_hf(cfg: ModelConfig, arch_name: str, eos_id: int | None, pad_id: int | None) -> dict:
    """The config.json mapping of `cfg` as Hugging Face architecture `arch_name`, with the tokenizer's end-of-text and
    pad ids."""
    arch = ARCHS[arch_name]
    d = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": arch.qkv_bias and arch_name == "qwen2",
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "bos_token_id": None,
        "use_cache": True,
    }
    if arch_name in ("qwen2", "qwen2_moe"):
        d["use_sliding_window"] = False
    if cfg.moe is not None and arch.moe:
        m, f = cfg.moe, arch.moe_fields
        d["num_experts"] = d["num_local_experts"] = m.n_experts  # both spellings across versions
        d[f["d_expert"]] = m.d_expert
        d["num_experts_per_tok"] = m.top_k
        d["norm_topk_prob"] = m.renormalize
        d["router_aux_loss_coef"] = m.lb_coef / m.top_k
        d["output_router_logits"] = False
        if arch_name in ("qwen2_moe", "qwen3_moe"):
            d["decoder_sparse_step"] = 2 if cfg.moe_pattern == "alternate" else 1
            d["mlp_only_layers"] = list(range(cfg.first_dense))
        if arch_name == "qwen2_moe":
            d["shared_expert_intermediate_size"] = m.d_shared_total
            d["qkv_bias"] = cfg.qkv_bias
        if arch_name == "mixtral":
            d["router_jitter_noise"] = m.jitter
    return d
