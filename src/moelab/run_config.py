"""Run configuration: model + data + optimizer + trainer, from YAML recipes with dotted
`key=value` overrides. Every error names the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from .config import FILE_RULES, ConfigError, ModelConfig

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes sequences: source, seq_len, validation share (by document),
    tokenizer reuse, tokenizer training budget, text field."""

    source: str = "stdlib"  # replaced by `--data`
    seq_len: int = 128
    val_fraction: float = 0.05  # share of *documents* held out for validation
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    tokenizer_train_bytes: int = 10_000_000  # train BPE on at most this much text
    text_field: str = "text"  # .jsonl / .parquet column

    def validate(self, p: str = "data.") -> None:
        """Raise ConfigError naming the first out-of-range field (as data.FIELD)."""
        _pos_int(self.seq_len, p + "seq_len")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{p}val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")


# optim.name's choices: moelab.train.optim.register_optimizer adds to them (a new optimizer is one registration)
OPTIMIZERS: list[str] = ["adamw", "muon"]


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon with AdamW beside it) and the learning-rate schedule: peak lr (or 'auto'),
    weight decay, betas, eps, grad clipping, cosine/WSD/constant schedule with warmup."""

    name: str = "adamw"  # one of OPTIMIZERS: muon is moelab.train.muon, with the same lr and weight decay
    momentum: float = 0.95  # Muon's
    ns_steps: int = 5  # Muon's Newton-Schulz iterations
    # their quintics: Keller Jordan's fixed one, or Polar Express's per-step optimal ones (moelab.train.polar;
    # measured in docs/quality.md: more orthogonal, not better at these sizes)
    ns_coeffs: Literal["jordan", "polar_express"] = "jordan"
    # their arithmetic: fp32 lands one step under two parallel layouts on the same weights to ~1e-6; bf16 is 2-3x
    # faster on CPUs with AMX (and GPUs) and reaches the same band of singular values, its quality over seeds not yet
    # measured; auto = bf16 where the device multiplies it natively (CUDA, AMX), fp32 elsewhere
    ns_dtype: Literal["auto", "fp32", "bf16"] = "fp32"
    # the routed experts under Muon: each expert's matrices orthogonalised alone, each stack as the one wide matrix
    # the layer is (E*F hidden units; ~E/3x fewer FLOPs at tiny-moe's shapes), or AdamW's update for them
    # (measured in docs/quality.md)
    # or Dion's low-rank orthonormal update (moelab.train.dion), dion_rank of each expert matrix's smaller side a step
    muon_experts: Literal["per_expert", "stacked", "adamw", "dion"] = "per_expert"
    dion_rank: float = 0.25
    muon_router: bool = False  # Muon for the router matrices too (else AdamW)
    expert_lr_mult: float = 1.0  # the routed experts' learning rate (and decay) as a multiple of the schedule's
    lr: float | Literal["auto"] = 3e-3  # "auto": the LR-scaling rule (MM1's, or lr_fit's)
    lr_fit: str | None = None  # fit.json from `moelab lr-fit`, used by lr=auto
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end

    @property
    def peak_lr(self) -> float:
        """The peak learning rate as a number; ConfigError while it is still 'auto' (the
        trainer resolves 'auto' before building the optimizer)."""
        if isinstance(self.lr, str):
            raise ConfigError("optim.lr=auto has not been resolved to a number yet")
        return self.lr

    def validate(self, p: str = "optim.") -> None:
        """Raise ConfigError naming the first out-of-range field (as optim.FIELD)."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"{p}name: expected one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr != "auto" and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{p}lr: expected a positive number, got {self.lr!r}")
        for name in ("beta1", "beta2", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: expected 0 <= {name} < 1, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{p}{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if not self.eps > 0:
            raise ConfigError(f"{p}eps: expected a positive number, got {self.eps!r}")
        if not (math.isfinite(self.expert_lr_mult) and self.expert_lr_mult > 0):
            raise ConfigError(f"{p}expert_lr_mult: expected a positive number, got {self.expert_lr_mult!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{p}min_lr_ratio: expected 0..1, got {self.min_lr_ratio!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"{p}decay_fraction: expected 0..1, got {self.decay_fraction!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{p}warmup_steps: expected >= 0, got {self.warmup_steps!r}")
        if not 1 <= self.ns_steps <= 20:
            raise ConfigError(f"{p}ns_steps: expected 1..20 Newton-Schulz iterations, got {self.ns_steps!r}")
        if not (isinstance(self.dion_rank, int | float) and 0 < self.dion_rank <= 1):
            raise ConfigError(f"{p}dion_rank: expected a fraction in (0, 1], got {self.dion_rank!r}")


MAX_MICRO_BATCH = 65536


@dataclass
class TrainConfig:
    """The loop: length, batch, accumulation, seed, precision, device, logging, evaluation, checkpoints and health
    thresholds."""

    steps: int = 1000  # the run's total length (the schedule's horizon)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    seed: int = 0
    # bf16 = autocast; auto = bf16 on CUDA devices with native bf16 (where grouped_mm
    # runs), fp32 elsewhere (CPUs without bf16 units are slow at it)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile each transformer block (docs/distributed.md: where it helps)
    activation_checkpointing: bool = False
    device: str = "auto"
    # torch intra-op threads on CPU; None = auto: one per core, fewer when other processes keep cores busy
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    spike_factor: float = 2.0  # warn when loss > factor x running median ...
    spike_window: int = 50  # ... of the last `spike_window` steps
    collapse_max_violation: float = 3.0  # warn when an MoE layer stays above this ...
    collapse_window: int = 20  # ... for this many consecutive logged steps
    # A NaN/inf loss or gradient norm: "stop" before the update (the default), or "skip"
    # the update and go on - at most `max_skipped_steps` in a row, then stop.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10

    def validate(self, p: str = "train.") -> None:
        """Raise ConfigError naming the first out-of-range field (as train.FIELD)."""
        counts = "steps batch_size grad_accum log_every eval_every ckpt_every eval_batches keep_checkpoints"
        for name in (*counts.split(), "spike_window", "collapse_window", "max_skipped_steps"):
            _pos_int(getattr(self, name), p + name)
        if self.batch_size > MAX_MICRO_BATCH:  # past any device's memory; the sampler would spin for minutes first
            raise ConfigError(
                f"{p}batch_size: expected at most {MAX_MICRO_BATCH:,} sequences per micro-batch, got "
                f"{self.batch_size:,} (a larger batch is train.grad_accum micro-batches)"
            )
        if self.threads is not None:
            _pos_int(self.threads, p + "threads")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32):
            raise ConfigError(f"{p}seed: expected an integer in 0..2**32-1 (numpy's seed range), got {self.seed!r}")
        if not self.spike_factor > 0:
            raise ConfigError(f"{p}spike_factor: expected a positive number, got {self.spike_factor!r}")
        if not self.collapse_max_violation >= 0:
            raise ConfigError(f"{p}collapse_max_violation: expected a number >= 0, got {self.collapse_max_violation!r}")
        if self.device != "auto" and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"{p}device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


# the pipeline schedules (torch.distributed.pipelining's, by parallel.pipeline_schedule's names): the one spelling
Schedule = Literal["1f1b", "interleaved_1f1b", "gpipe", "looped_bfs", "interleaved_zb"]
MULTI_STAGE_SCHEDULES: tuple[Schedule, ...] = ("interleaved_1f1b", "looped_bfs", "interleaved_zb")


@dataclass
class ParallelConfig:
    """Layout of a multi-process run (torchrun): the expert-parallel degree, carved out of
    data parallelism, and the data-parallel degree as sharded x replicated; 0 = fill the
    world (replicated, unless data_shard says otherwise). One process ignores it."""

    expert: int = 1
    data_shard: int = 0
    data_replicate: int = 0
    # pipeline stages (torch.distributed.pipelining); train.grad_accum micro-batches per step
    pipeline: int = 1
    # interleaved_1f1b, looped_bfs and interleaved_zb (zero bubble) run V >= 2 stages per rank
    pipeline_schedule: Schedule = "1f1b"
    virtual_stages: int = 1  # stages per rank
    pipeline_split: list[int] | None = None  # first layer of stages 1 .. P x V - 1; null: as even as possible

    def validate(self, p: str = "parallel.") -> None:
        """Raise ConfigError naming the first field that is not a usable degree."""
        _pos_int(self.expert, p + "expert")
        _pos_int(self.pipeline, p + "pipeline")
        _pos_int(self.virtual_stages, p + "virtual_stages")
        if (self.virtual_stages > 1) != (self.pipeline_schedule in MULTI_STAGE_SCHEDULES):
            raise ConfigError(
                f"{p}virtual_stages={self.virtual_stages} with {p}pipeline_schedule={self.pipeline_schedule}: "
                f"{', '.join(MULTI_STAGE_SCHEDULES)} need 2 or more stages per rank, the others one"
            )
        for name in ("data_shard", "data_replicate"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{p}{name}: expected an integer >= 0 (0 = fill the world), got {v!r}")


@dataclass
class FinetuneConfig:
    """How `moelab finetune` trains: the recipe (what is trainable), expert dropout, aux loss, data sample, template."""

    recipe: Literal["none", "full", "freeze-experts", "freeze-router", "experts-only", "lora"] = "none"
    expert_dropout: float = 0.0  # copied into model.moe.expert_dropout
    aux_loss: bool = True  # false: lb and z coefficients set to 0 (printed, never silent)
    # Train on a seeded sample of this many examples: small fine-tuning sets are where
    # sparse models were found to overfit, so the report needs to be able to make one.
    train_examples: int | None = None
    # auto: the model's own chat template when its run folder has one (imported), else moelab's
    chat_template: Literal["auto", "moelab"] = "auto"

    def validate(self, p: str = "finetune.") -> None:
        """Raise ConfigError naming the first out-of-range field (as finetune.FIELD)."""
        if not 0 <= self.expert_dropout < 1:
            raise ConfigError(f"{p}expert_dropout: expected 0 <= p < 1, got {self.expert_dropout!r}")
        if self.train_examples is not None:
            _pos_int(self.train_examples, p + "train_examples")


@dataclass
class QuantConfig:
    """Weight-only quantization a checkpoint was written with (`moelab quantize`); bits 0 = none."""

    bits: int = 0
    group_size: int = 64
    what: Literal["experts", "all"] = "experts"


@dataclass
class LoraConfig:
    """LoRA adapters of `--recipe lora`: rank, scale alpha, and which weights they wrap."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "attn,experts"  # comma-separated: attn, experts, router, ffn

    def target_list(self) -> list[str]:
        """`targets` as a list."""
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass
class RunConfig:
    """Everything one run needs: model, data, optimizer, trainer, fine-tuning and LoRA settings, saved as
    RUN/config.yaml."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Validate every section; ConfigError names the first bad field by its dotted key."""
        self.finetune.validate()
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.parallel.validate()
        if self.model.n_moe_layers == 0:  # a dense model: an experts' setting would do nothing, silently
            if self.optim.expert_lr_mult != 1.0:
                raise ConfigError(f"optim.expert_lr_mult={self.optim.expert_lr_mult}: the model has no routed experts")
            if self.optim.muon_experts != "per_expert":
                raise ConfigError(f"optim.muon_experts={self.optim.muon_experts}: the model has no routed experts")
        if self.optim.muon_experts == "stacked" and self.parallel.expert > 1:
            raise ConfigError(  # a rank holds only its experts: it would orthogonalise a part of the stack
                "optim.muon_experts: 'stacked' needs every expert on one rank; use per_expert with parallel.expert > 1"
            )
        if self.optim.muon_experts == "dion" and self.parallel.data_shard > 1:
            raise ConfigError(  # a shard would hold a part of each expert's basis: not built
                "optim.muon_experts: 'dion' keeps each expert whole on its rank; use data_replicate or parallel.expert"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> dict:
        """The config as nested plain dicts (what config.yaml holds)."""
        return dataclasses.asdict(self)


def _pos_int(v: Any, key: str) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ConfigError(f"{key}: expected a positive integer, got {v!r}")


# How pydantic reads each section from a file (config.FILE_RULES): unknown keys and NaN/inf are errors.
_SECTIONS = (DataConfig, OptimConfig, TrainConfig, ParallelConfig, FinetuneConfig, QuantConfig, LoraConfig)
for _cls in (*_SECTIONS, RunConfig):
    setattr(_cls, "__pydantic_config__", FILE_RULES)  # noqa: B010 - a class attribute pydantic reads, not a field


# ---------------------------------------------------------------- validation (pydantic)
def _unknown(key: str, name: str, choices) -> ConfigError:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; known keys: {', '.join(sorted(choices))}")


def _section(hint: Any) -> Any:
    """The config dataclass a field holds (`MoEConfig | None` -> MoEConfig), else None."""
    return next((a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)), None)


def _words(hint: Any) -> str:
    """What a field's type accepts, as a YAML writer would say it."""
    if typing.get_origin(hint) is Literal:
        options = typing.get_args(hint)
        return f"one of {list(options)}" if len(options) > 1 else repr(options[0])
    if typing.get_origin(hint) in (list, tuple):
        return "a list of integers" if typing.get_args(hint) == (int,) else "a list"
    args = typing.get_args(hint)
    if args:
        return " or ".join(_words(a) for a in args)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, "a mapping" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint)))


def _config_error(e: pydantic.ValidationError) -> ConfigError:
    """pydantic's first error as one line naming the dotted key (a union's branches report
    one error each, at the same key: one line says what the field takes)."""
    err = e.errors()[0]
    cls: Any = RunConfig
    keys: list[str] = []
    hint: Any = RunConfig
    for part in err["loc"]:  # field names, then (inside a union) branch tags, which are not keys
        names = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
        if not isinstance(part, str) or (part not in names and err["type"] != "unexpected_keyword_argument"):
            break
        keys.append(part)
        if part not in names:
            return _unknown(".".join(keys), part, names)
        hint = typing.get_type_hints(cls)[part]
        cls = _section(hint)
    key = ".".join(keys) or "config"
    if err["type"] == "value_error":  # a section's own check (ModelConfig, MoEConfig) names itself "moe.x"
        msg = str(err["ctx"]["error"])
        return ConfigError(f"{key}.{msg.split('.', 1)[1]}" if keys and "." in msg.split(":")[0] else msg)
    if err["type"] == "finite_number":
        return ConfigError(f"{key}: expected a finite number, got {err['input']!r}")
    return ConfigError(f"{key}: expected {_words(hint)}, got {err['input']!r}")


_VALIDATOR = pydantic.TypeAdapter(RunConfig)


def _prepare_model_dict(d: dict) -> None:
    """The MoE's d_model is the model's: fill it in so recipes never repeat it."""
    model = d.get("model")
    if isinstance(model, dict) and isinstance(model.get("moe"), dict):
        model["moe"].setdefault("d_model", model.get("d_model", ModelConfig.d_model))


def config_from_dict(d: dict) -> RunConfig:
    """A validated RunConfig from nested dicts; ConfigError naming an unknown key or a wrong type by its dotted path."""
    d = copy.deepcopy(d)
    _prepare_model_dict(d)
    try:  # strict, from JSON: YAML's types are JSON's, and strict JSON mode still takes a mapping for a section
        cfg = _VALIDATOR.validate_json(json.dumps(d, default=str), strict=True)
    except pydantic.ValidationError as e:
        raise _config_error(e) from None
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- files and overrides
def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(recipe_or_yaml: str) -> dict:
    """A named recipe's or a YAML file's settings as nested dicts, `name` defaulting to the file's stem."""
    path = Path(recipe_or_yaml)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{recipe_or_yaml}.yaml"
        if not path.exists():
            raise ConfigError(
                f"recipe '{recipe_or_yaml}' not found: not a file, and not one of the named recipes {list_recipes()}"
            )
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        d = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.constructor.ConstructorError as e:  # a repeated key: one line, the lines named in it
        raise ConfigError(f"{path}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    d.setdefault("name", path.stem)
    return d


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        """The mapping; a ConstructorError naming the repeated key and its lines."""
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}): "
                    "keep one", key_node.start_mark)  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets a nested key; the value is parsed as YAML (numbers, true, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. model.moe.n_experts=16")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        parts = key.strip().split(".")
        node: dict = d
        cls: Any = RunConfig
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown(dotted, part, names)
            if i == len(parts) - 1:
                node[part] = value
                break
            cls = _section(typing.get_type_hints(cls)[part])
            if cls is None:
                raise ConfigError(f"{dotted}: is a value, not a section")
            if not isinstance(node.get(part), dict):
                node[part] = {}  # e.g. model.moe.n_experts=8 on a dense recipe creates the MoE
            node = node[part]
    return d


def _parse_value(raw: str) -> Any:
    """YAML scalars, plus the float spellings YAML 1.1 reads as strings ('1e-3')."""
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def load_config(recipe_or_yaml: str, overrides: list[str] | None = None) -> RunConfig:
    """A named recipe or YAML file with dotted `key=value` overrides applied, validated. A
    measuring router override (model.moe.router_override) must be named among the overrides:
    it changes what a model learns, so a recipe that merely carries it is refused."""
    cfg = config_from_dict(apply_overrides(read_recipe(recipe_or_yaml), overrides or []))
    forced = cfg.model.moe.router_override if cfg.model.moe is not None else "none"
    if forced != "none" and not any(o.split("=")[0].strip() == "model.moe.router_override" for o in overrides or []):
        raise ConfigError(
            f"model.moe.router_override: {recipe_or_yaml} sets {forced!r}, which forces the routing and changes what "
            f"the model learns (it is for `moelab profile`); give it as an override to use it anyway"
        )
    return cfg


def read_config(path: Path) -> RunConfig:
    """A run folder's saved config.yaml (as written by `save_config`)."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e})") from None
    return config_from_dict(d or {})


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write `cfg` as YAML to `path` (read back by read_config). The process layout
    (`parallel`) is left out: it belongs to a launch, not to the run - checkpoints
    reshard, and a config derived from this one (resume, finetune, upcycle) must not
    demand torchrun. Each distributed checkpoint records its layout instead. A measuring
    router override (model.moe.router_override) is left out too: it must be named anew."""
    d = cfg.to_dict()
    d.pop("parallel", None)
    if d["model"].get("moe"):
        d["model"]["moe"].pop("router_override", None)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
