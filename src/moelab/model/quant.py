"""Weight-only, group-wise quantization of expert (or all matmul) weights, 8/4/3/2 bits.

Each weight (..., O, I) - a 3-D expert tensor (E, O, I) quantizes per expert - is cut
into groups of G consecutive inputs per output row. A group with range [lo, hi] gets a
scale s = (hi - lo) / (2^b - 1) (rounded *up* to float16, so the range still fits) and a
float16 zero point z = -lo / s; a weight w becomes the code q = round(w / s + z) in
[0, 2^b - 1] and is read back as (q - z) * s. Because the codes are never clamped, the
error of every weight is at most s / 2 - the bound the tests check for each width.
Codes are bit-packed into uint8 (3 bits: 8 codes in 3 bytes), so b bits per weight plus
32 / G bits of scale and zero are resident.

The quantized weight is a `torch.nn.utils.parametrize` parametrization whose originals
are (packed codes, scales, zeros): every module keeps its own code path, and reading
the weight dequantizes it on the fly - for the experts, just before the grouped matmul.
Checkpoints hold the packed tensors in safetensors; the run's config.yaml records
`quant.bits/group_size/what` so loading rebuilds the same parametrizations.

torchao's affine quantize/dequantize would cover the arithmetic but not 3-bit packing of
3-D expert tensors into safetensors, and it pins torch versions tightly; these ~100
lines keep moelab on any torch >= 2.6.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..moe.experts import GroupedExperts
from .blocks import SwiGLU

BITS = (2, 3, 4, 8)


def _check(bits: int, group_size: int, in_features: int, what: str) -> None:
    if bits not in BITS:
        raise ConfigError(f"--bits: expected one of {list(BITS)}, got {bits}")
    if group_size < 2 or in_features % group_size:
        raise ConfigError(
            f"--group-size: {group_size} does not divide the input size {in_features} of {what} "
            "(expected a divisor >= 2, e.g. 32, 64 or 128)"
        )


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor, `bits` bits each."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_stream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1)
    bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(-len(bit_stream) % 8)])
    return (bit_stream.view(-1, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of `pack_bits` output, as int32."""
    if bits == 8:
        return packed[:n].to(torch.int32)
    bit_stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    b = bit_stream[: n * bits].view(n, bits).to(torch.int32)
    return (b << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(1)


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes uint8, scales fp16 (..., O, I/G), zeros fp16 (..., O, I/G)) of `w` (..., O, I)."""
    _check(bits, group_size, w.shape[-1], f"a weight of shape {tuple(w.shape)}")
    levels = 2**bits - 1
    g = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    s16 = scale.half()
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, torch.inf)), s16)
    z16 = (-lo / s16.float()).half()
    codes = torch.round(g / s16.float().unsqueeze(-1) + z16.float().unsqueeze(-1)).clamp_(0, levels)
    return pack_bits(codes, bits), s16, z16


def dequantize_tensor(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """The fp32 weight of `shape` that `quantize_tensor` encoded."""
    n = 1
    for d in shape:
        n *= d
    codes = unpack_bits(packed, bits, n).view(*scale.shape, -1).float()
    return ((codes - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).view(shape)


class Dequantize(nn.Module):
    """Parametrization: originals (packed, scale, zero) -> the fp32 weight, on every read."""

    def __init__(self, bits: int, group_size: int, shape: tuple[int, ...]):
        super().__init__()
        self.bits, self.group_size, self.shape = bits, group_size, tuple(shape)

    def forward(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The dequantized weight."""
        return dequantize_tensor(packed, scale, zero, self.bits, self.shape)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize a weight into the stored originals."""
        return quantize_tensor(w, self.bits, self.group_size)


def targets(model: nn.Module, what: str) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, dotted name) of each weight to quantize: the routed experts'
    w_gate/w_up/w_down ("experts"), or every matmul weight except embeddings and routers
    ("all": attention, dense FFNs, shared and routed experts, an untied output head)."""

    if what not in ("experts", "all"):
        raise ConfigError(f"--what: expected experts or all, got {what!r}")
    out: list[tuple[nn.Module, str, str]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts) or (what == "all" and isinstance(mod, SwiGLU)):
            out += [(mod, a, f"{name}.{a}") for a in ("w_gate", "w_up", "w_down")]
        elif what == "all" and isinstance(mod, nn.Linear) and not name.endswith("router") and "gate" not in name:
            out.append((mod, "weight", f"{name}.weight"))
    return out


def default_group_size(model: nn.Module, what: str = "experts", largest: int = 64) -> int:
    """The group size `quantize_model` takes when none is given: the largest divisor of `largest` that divides the
    input size of every weight it quantizes (64 for most models; 32 for one 32 wide)."""
    return math.gcd(largest, *(getattr(mod, attr).shape[-1] for mod, attr, _ in targets(model, what)))


def quantize_model(model: nn.Module, bits: int, group_size: int, what: str = "experts") -> int:
    """Quantize `model`'s weights in place (see `targets`); returns how many were. Raises
    ConfigError naming a bit width or group size that does not fit."""
    chosen = targets(model, what)
    if not chosen:
        raise ConfigError(f"--what {what}: this model has no such weights (a dense model has no experts)")
    for mod, attr, name in chosen:  # check every size before changing anything
        _check(bits, group_size, getattr(mod, attr).shape[-1], name)
    for mod, attr, _ in chosen:
        w = getattr(mod, attr)
        w.requires_grad_(False)  # uint8 originals cannot carry gradients
        parametrize.register_parametrization(mod, attr, Dequantize(bits, group_size, tuple(w.shape)), unsafe=True)
    return len(chosen)


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized weight of `model` by its fp32 dequantized value, in place
    (what an exporter writes: formats that load plain weights); returns how many were."""
    chosen = [
        (mod, attr)
        for mod in model.modules()
        if parametrize.is_parametrized(mod)
        for attr, plist in mod.parametrizations.items()  # type: ignore[union-attr, operator]  # a ModuleDict here
        if any(isinstance(p, Dequantize) for p in plist)
    ]
    for mod, attr in chosen:
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    return len(chosen)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (packed codes count as stored)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def planned_bytes(cfg, bits: int, group_size: int, what: str) -> dict[str, int]:
    """Resident bytes of a model config quantized so (fp32 parameters elsewhere, buffers
    as they are), counted on a meta-device model: {"quantized", "other", "total"}."""
    from .transformer import Transformer  # the model package's root imports this module

    with torch.device("meta"):
        model = Transformer(cfg)
    chosen = targets(model, what)
    q = sum(getattr(m, a).numel() for m, a, _ in chosen)
    total = sum(p.numel() for p in model.parameters())
    qbytes = sum(-(-getattr(m, a).numel() * bits // 8) + getattr(m, a).numel() // group_size * 4 for m, a, _ in chosen)
    other = (total - q) * 4 + sum(b.numel() * b.element_size() for b in model.buffers())  # e.g. RoPE tables
    return {"quantized": qbytes, "other": other, "total": qbytes + other}
