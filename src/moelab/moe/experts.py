"""Routed SwiGLU experts and the grouped-matmul seam.

Legend: N rows (token-expert assignments, grouped by expert), D model dim,
F expert hidden, E experts.

`grouped_linear` is the one place a faster kernel plugs in. Backends:
- "grouped_mm": `torch.nn.functional.grouped_mm` (one call for all experts; on CPU it
  wants fp32, on CUDA bf16 on sm80+, and 16-byte-aligned strides);
- "loop": per-expert matmuls over `unbind`-ed weights and `split` rows. Indexing `w[e]`
  instead would make autograd zero-fill a gradient the size of all experts once per
  expert; `unbind` gives each slice its own gradient view.
"auto" picks grouped_mm where it is known to work.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Backend = Literal["auto", "grouped_mm", "loop"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_mm_supported(x_ND: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether F.grouped_mm accepts these operands (dtype, device, stride alignment)."""
    if not _HAS_GROUPED_MM or x_ND.dtype != w_EOI.dtype:
        return False
    if x_ND.device.type == "cpu":
        ok_dtype = x_ND.dtype == torch.float32
    elif x_ND.device.type == "cuda":
        ok_dtype = x_ND.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device)[0] >= 8
    else:
        ok_dtype = False
    # Both inner dims must give 16-byte row strides (forward and the transposed backward).
    align = 16 // x_ND.element_size()
    return ok_dtype and w_EOI.shape[1] % align == 0 and w_EOI.shape[2] % align == 0


def grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor,
                   backend: Backend = "auto", counts_list: list[int] | None = None) -> torch.Tensor:
    """Rows of group e times w[e].T: (N, I) x (E, O, I) -> (N, O). Rows are grouped by
    expert in order, `counts_E[e]` rows each."""
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_supported(x_ND, w_EOI) else "loop"
    if backend == "grouped_mm":
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offs_E)
    sizes = counts_list if counts_list is not None else counts_E.tolist()
    outs = [F.linear(x_nI, w_OI) for x_nI, w_OI in zip(x_ND.split(sizes), w_EOI.unbind(0))]
    return torch.cat(outs, dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors: w_gate, w_up (E, F, D); w_down (E, D, F)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: Backend = "auto"):
        super().__init__()
        self.backend: Backend = backend
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, d_expert))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = x_ND.dtype
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
        x_ND = x_ND.to(dtype)
        w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))
        backend = self.backend
        if backend == "auto":
            backend = "grouped_mm" if grouped_mm_supported(x_ND, w_gate) else "loop"
        # The loop backend needs host-side sizes; fetch them once, not three times.
        sizes = counts_E.tolist() if backend == "loop" else None
        with torch.autocast(x_ND.device.type, enabled=False):
            gate_NF = grouped_linear(x_ND, w_gate, counts_E, backend, sizes)
            up_NF = grouped_linear(x_ND, w_up, counts_E, backend, sizes)
            return grouped_linear(F.silu(gate_NF) * up_NF, w_down, counts_E, backend, sizes)
