"""Export a moelab LoRA run as a `peft` adapter for the exported Hugging Face model.

transformers 5 holds each MoE layer's experts fused: `mlp.experts.gate_up_proj`
(E, 2F, D) and `mlp.experts.down_proj` (E, D, F). peft reaches them through
`target_parameters`; its per-expert factors are lora_A (E*r, in) and lora_B (out, r*E)
laid out expert-minor in B. moelab's separate gate and up adapters become one rank-2r
adapter on gate_up_proj (A stacked, B block-diagonal), with alpha doubled so the scale
alpha/r stays the same: the delta is identical, not approximated.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from ..config import ConfigError
from ..model import Transformer
from ..model.lora import LoRADelta, apply_lora
from .io import export_hf

ATTN_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def _deltas(model) -> dict[str, LoRADelta]:
    out = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for attr, plist in mod.parametrizations.items():
                out[f"{name}.{attr}"] = plist[0]
    return out


def _base_copy(model):
    base = copy.deepcopy(model)
    for mod in list(base.modules()):
        if parametrize.is_parametrized(mod):
            for attr in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
    return base


def _peft_config(targets: list[str], r: int, alpha: float):  # -> peft.LoraConfig (peft is optional)
    """peft's LoraConfig for moelab's targets: attention projections as modules; the fused
    expert weights and the router as parameters (gate and up share one adapter of rank 2r)."""
    from peft import LoraConfig

    modules, params, rank_pattern, alpha_pattern = [], [], {}, {}
    if "attn" in targets:
        modules += list(ATTN_HF.values())
    if "experts" in targets:
        params += ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        rank_pattern["gate_up_proj"] = 2 * r
        alpha_pattern["gate_up_proj"] = 2 * alpha
    if "router" in targets:
        params += ["mlp.gate.weight"]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; the scale alpha / r takes any number
        target_modules=modules or None,
        target_parameters=params or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
    )


@torch.no_grad()
def export_peft(cfg, state: dict, tokenizer_file: Path | None, out: Path) -> tuple[Path, Path]:
    """Write out/base (HF model of the base weights) and out/adapter (peft). Returns both."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    targets = cfg.lora.target_list()
    if "ffn" in targets:
        raise ConfigError("peft export: lora target 'ffn' is not exported yet (attn, experts, router are)")
    model = Transformer(cfg.model)
    apply_lora(model, targets, cfg.lora.rank, cfg.lora.alpha)
    model.load_state_dict(state)
    base_dir = export_hf(_base_copy(model).eval(), Path(out) / "base", tokenizer_file)
    hf = AutoModelForCausalLM.from_pretrained(base_dir)
    deltas = _deltas(model)
    peft_cfg = _peft_config(targets, cfg.lora.rank, cfg.lora.alpha)
    r = cfg.lora.rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pm = get_peft_model(hf, peft_cfg)

    def put(layer_name: str, A: torch.Tensor, B: torch.Tensor):
        """Find the peft LoRA layer for `layer_name` (module or parameter path) and set A, B."""
        for name, mod in pm.named_modules():
            pname = getattr(mod, "parameter_name", None)
            name = name.replace(".base_layer", "")  # peft nests wrappers of one module's parameters
            full = f"{name}.{pname}" if pname else name
            if full.endswith(layer_name) and hasattr(mod, "lora_A") and "default" in mod.lora_A:
                mod.lora_A["default"].weight.copy_(A)
                mod.lora_B["default"].weight.copy_(B)
                return
        raise ConfigError(f"peft export: no adapter slot for {layer_name}")

    for i, layer in enumerate(model.layers):
        pre = f"layers.{i}."
        if "attn" in targets:
            for ours, theirs in ATTN_HF.items():
                d = deltas[f"{pre}attn.{ours}.weight"]
                put(f"model.layers.{i}.self_attn.{theirs}", d.lora_A, d.lora_B)
        if layer.is_moe and "experts" in targets:
            g, u, dn = (deltas[f"{pre}ffn.experts.{w}"] for w in ("w_gate", "w_up", "w_down"))
            E, F = g.lora_B.shape[0], g.lora_B.shape[1]
            A = torch.cat([g.lora_A, u.lora_A], dim=1)  # (E, 2r, D)
            B = torch.zeros(E, 2 * F, 2 * r)
            B[:, :F, :r], B[:, F:, r:] = g.lora_B, u.lora_B
            put(
                f"model.layers.{i}.mlp.experts.gate_up_proj",
                A.reshape(E * 2 * r, -1),
                B.permute(1, 2, 0).reshape(2 * F, 2 * r * E),
            )
            put(
                f"model.layers.{i}.mlp.experts.down_proj",
                dn.lora_A.reshape(E * r, -1),
                dn.lora_B.permute(1, 2, 0).reshape(dn.lora_B.shape[1], r * E),
            )
        if layer.is_moe and "router" in targets:
            d = deltas[f"{pre}ffn.router.weight"]
            put(f"model.layers.{i}.mlp.gate.weight", d.lora_A, d.lora_B)
    adapter_dir = Path(out) / "adapter"

    with warnings.catch_warnings():  # peft warns that pattern keys match no *module*; they match parameters
        warnings.simplefilter("ignore", RuntimeWarning)
        pm.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir
