"""Typed configuration for the MoE layer and the transformer.

Each component owns a small dataclass that validates itself and knows its own parameter
counts (total and active), which the memory planner and the LR-scaling fit rely on.
Errors name the offending field by its dotted path so YAML and `key=value` overrides can
be fixed without reading code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .errors import ConfigError

# How pydantic reads these dataclasses from a config file (run_config.config_from_dict):
# an unknown key or a NaN/inf is an error there, not a silently kept value.
FILE_RULES: dict = {"extra": "forbid", "allow_inf_nan": False}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_finite(obj, prefix: str) -> None:
    """Every float field of a config dataclass is a finite number: NaN or inf (as in
    `capacity_factor=inf`) is refused here, naming the key, rather than deep in a step."""

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name}: expected a finite number, got {v!r}")


@dataclass
class MoEConfig:
    """One MoE layer: E routed SwiGLU experts of hidden size F, k chosen per token.

    `capacity_factor=None` is dropless. Otherwise each expert takes at most
    ceil(capacity_factor * tokens * top_k / n_experts) assignments and drops the rest,
    lowest router weight first. `eval_capacity_factor` applies in `eval()` mode
    (None = dropless at evaluation).
    """

    __pydantic_config__: ClassVar[dict] = FILE_RULES

    d_model: int = 256
    d_expert: int = 512
    n_experts: int = 8
    top_k: int = 2
    router: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    n_shared_experts: int = 0
    d_shared: int | None = None  # hidden size of one shared expert; None = d_expert
    shared_gate: bool = False
    jitter: float = 0.0
    lb_coef: float = 0.01
    z_coef: float = 0.001
    bias_update_rate: float = 0.0
    expert_dropout: float = 0.0  # dropout on the experts' hidden units in training (ST-MoE fine-tuning)
    router_init_std: float | None = None  # None = sqrt(0.1 / d_model), Switch's reduced scale
    # std of the experts' (and shared experts') output projections; None = the model's
    # depth-scaled init_std / sqrt(2 n_layers), a number = that std (Mixtral/OLMoE: 0.02)
    expert_out_std: float | None = None
    # Where the load-balancing loss counts expert frequencies: "micro" = this micro-batch
    # on this rank; "global" = summed over data-parallel ranks and over the step's
    # micro-batches so far (Qwen, "Demons in the detail", 2025).
    balance_scope: Literal["micro", "global"] = "micro"
    # For measurement only (`moelab profile`): "balanced" gives every expert the same
    # number of rows +-1 whatever the router prefers, the combine weights still the
    # router's. It changes what a model learns, so `moelab train` takes it only when
    # named on its command line, and a run's saved config never keeps it.
    router_override: Literal["none", "balanced"] = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "moe") -> None:
        """Raise ConfigError naming the first field (as PREFIX.field) that is out of range or inconsistent."""
        p = prefix + "."
        check_finite(self, p)
        for name in ("d_model", "d_expert", "n_experts", "top_k"):
            v = getattr(self, name)
            _check(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                p + name,
                f"expected a positive integer, got {v!r}",
            )
        _check(self.top_k <= self.n_experts, p + "top_k", f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        _check(
            self.router in ("softmax", "sigmoid"), p + "router", f"expected 'softmax' or 'sigmoid', got {self.router!r}"
        )
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            _check(
                v is None or (isinstance(v, (int, float)) and v > 0),
                p + name,
                f"expected a positive number or null (dropless), got {v!r}",
            )
        _check(
            isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
            p + "n_shared_experts",
            f"expected an integer >= 0, got {self.n_shared_experts!r}",
        )
        _check(
            self.d_shared is None or (isinstance(self.d_shared, int) and self.d_shared > 0),
            p + "d_shared",
            f"expected a positive integer or null, got {self.d_shared!r}",
        )
        _check(
            not self.shared_gate or self.n_shared_experts > 0,
            p + "shared_gate",
            "a shared-expert gate needs n_shared_experts > 0",
        )
        _check(
            self.expert_out_std is None or (isinstance(self.expert_out_std, (int, float)) and self.expert_out_std > 0),
            p + "expert_out_std",
            f"expected a positive standard deviation or null, got {self.expert_out_std!r}",
        )
        _check(
            0.0 <= self.expert_dropout < 1.0,
            p + "expert_dropout",
            f"expected 0 <= expert_dropout < 1, got {self.expert_dropout!r}",
        )
        _check(
            self.balance_scope in ("micro", "global"),
            p + "balance_scope",
            f"expected 'micro' or 'global', got {self.balance_scope!r}",
        )
        _check(
            self.router_override in ("none", "balanced"),
            p + "router_override",
            f"expected 'none' or 'balanced', got {self.router_override!r}",
        )
        _check(0.0 <= self.jitter < 1.0, p + "jitter", f"expected 0 <= jitter < 1, got {self.jitter!r}")
        for name in ("lb_coef", "z_coef", "bias_update_rate"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, p + name, f"expected a number >= 0, got {v!r}")
        _check(
            self.router_init_std is None or self.router_init_std > 0,
            p + "router_init_std",
            f"expected a positive standard deviation or null, got {self.router_init_std!r}",
        )

    @property
    def d_shared_total(self) -> int:
        """Hidden size of the fused shared SwiGLU (S * F_s)."""
        return self.n_shared_experts * (self.d_shared or self.d_expert)

    @property
    def init_std_router(self) -> float:
        """Standard deviation of the router's initial weights: router_init_std, else sqrt(0.1 / d_model) (Switch's 0.1
        scale on a fan-in variance)."""
        return self.router_init_std if self.router_init_std is not None else math.sqrt(0.1 / self.d_model)

    def params_total(self) -> int:
        """Parameters of one MoE layer: router, all routed experts and the shared experts (with their gate)."""
        D, F, E = self.d_model, self.d_expert, self.n_experts
        shared = 3 * D * self.d_shared_total + (D if self.shared_gate else 0)
        return E * D + E * 3 * F * D + shared

    def params_active(self) -> int:
        """Parameters one token touches: the whole router, k experts, the shared part."""
        D, F = self.d_model, self.d_expert
        shared = 3 * D * self.d_shared_total + (D if self.shared_gate else 0)
        return self.n_experts * D + self.top_k * 3 * F * D + shared


LayerPattern = Literal["all", "alternate", "none"]


@dataclass
class ModelConfig:
    """Llama-style decoder. The FFN of layer i is MoE when `is_moe_layer(i)`.

    `moe_pattern`: "all" (every layer), "alternate" (odd layers, GShard/Switch style),
    "none" (dense). `first_dense` keeps the first k layers dense in any pattern
    (DeepSeek style).
    """

    __pydantic_config__: ClassVar[dict] = FILE_RULES

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); fewer = grouped-query attention
    d_ff: int = 1024  # hidden size of dense SwiGLU layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm on q, k: per head (Qwen3) or whole (OLMoE)
    qkv_bias: bool = False
    init_std: float = 0.02
    moe: MoEConfig | None = None
    moe_pattern: LayerPattern = "all"
    first_dense: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**{"d_model": self.d_model, **self.moe})
        self.validate()

    def validate(self, prefix: str = "model") -> None:
        """Raise ConfigError naming the first field (as PREFIX.field) that is out of range or inconsistent; validates
        the MoE config too."""
        p = prefix + "."
        check_finite(self, p)
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v > 0, p + name, f"expected a positive number, got {v!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            _check(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                p + name,
                f"expected a positive integer, got {v!r}",
            )
        _check(
            self.d_model % self.n_heads == 0,
            p + "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        _check(
            (self.d_model // self.n_heads) % 2 == 0, p + "n_heads", "head dimension must be even for rotary embeddings"
        )
        kv = self.kv_heads
        _check(
            kv > 0 and self.n_heads % kv == 0,
            p + "n_kv_heads",
            f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}",
        )
        _check(
            self.qk_norm in ("none", "head", "full"),
            p + "qk_norm",
            f"expected 'none', 'head' or 'full', got {self.qk_norm!r}",
        )
        _check(
            self.moe_pattern in ("all", "alternate", "none"),
            p + "moe_pattern",
            f"expected 'all', 'alternate' or 'none', got {self.moe_pattern!r}",
        )
        _check(
            isinstance(self.first_dense, int) and 0 <= self.first_dense <= self.n_layers,
            p + "first_dense",
            f"expected 0..n_layers, got {self.first_dense!r}",
        )
        if self.moe is not None:
            _check(
                self.moe.d_model == self.d_model,
                p + "moe.d_model",
                f"{self.moe.d_model} differs from model.d_model={self.d_model}",
            )
            self.moe.validate(p + "moe")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when unset (no grouping)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        """Per-head dimension, d_model / n_heads."""
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer `i` (0-based) has an MoE FFN under moe_pattern and first_dense."""
        if self.moe is None or self.moe_pattern == "none" or i < self.first_dense:
            return False
        return self.moe_pattern == "all" or i % 2 == 1

    def dense_twin(self) -> ModelConfig:
        """The dense model with the same active FFN width (d_ff = k*F + S*F_s): equal active parameters but for the
        router. A dense config is its own twin."""
        if self.moe is None:
            return self
        return self._dense(self.moe.top_k * self.moe.d_expert + self.moe.d_shared_total)

    def dense_total_twin(self) -> ModelConfig:
        """The dense model with the same total parameters, built the way `dense_twin` is: every FFN as wide as all
        of an MoE layer's experts (d_ff = E*F + S*F_s; the router's E*D weights are left out)."""
        if self.moe is None:
            return self
        return self._dense(self.moe.n_experts * self.moe.d_expert + self.moe.d_shared_total)

    def _dense(self, d_ff: int) -> ModelConfig:
        return ModelConfig(**{**self.__dict__, "moe": None, "d_ff": d_ff, "moe_pattern": "none"})

    @property
    def n_moe_layers(self) -> int:
        """How many layers have an MoE FFN."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # ---- counting: these match the module's parameters exactly (tested) ----
    def _attn_params(self) -> int:
        D, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, self.kv_heads * hd
        n = D * q + 2 * D * kv + q * D
        if self.qkv_bias:
            n += q + 2 * kv
        if self.qk_norm == "head":
            n += 2 * hd
        elif self.qk_norm == "full":
            n += q + kv
        return n

    def param_counts(self) -> dict[str, int]:
        """total, active, embedding, non_embedding and active_non_embedding parameters.

        Embedding parameters are the token embedding and the output head (one matrix if
        tied); non-embedding counts exclude them, as in Kaplan et al. and MM1's LR fit.
        """
        D, V = self.d_model, self.vocab_size
        dense_ffn = 3 * D * self.d_ff
        body_total = body_active = 0
        for i in range(self.n_layers):
            body = self._attn_params() + 2 * D  # two RMSNorms
            if self.moe is not None and self.is_moe_layer(i):
                body_total += body + self.moe.params_total()
                body_active += body + self.moe.params_active()
            else:
                body_total += body + dense_ffn
                body_active += body + dense_ffn
        body_total += D  # final norm
        body_active += D
        emb = V * D * (1 if self.tie_embeddings else 2)
        return {
            "total": body_total + emb,
            "active": body_active + emb,
            "embedding": emb,
            "non_embedding": body_total,
            "active_non_embedding": body_active,
        }

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * active matmul params + attention (PaLM's 12*L*D*T).

        Matmul params are the active non-embedding weights plus the output head (the
        embedding lookup costs no FLOPs); norms are negligible but counted for simplicity.
        """
        T = seq_len or self.max_seq_len
        n = self.param_counts()["active_non_embedding"] + self.vocab_size * self.d_model
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * T
