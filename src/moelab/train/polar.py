"""Muon's orthogonalisation: the polar factor U V^T of each matrix G = U S V^T, approximately, by odd-polynomial
(Newton-Schulz) iterations, with every matrix of the same shape in one batched call.

Legend: N matrices in a batch, each oriented A x B with A <= B (a tall matrix is iterated transposed, so the square
it multiplies by is the small A x A one); s steps.

Coefficients, an odd quintic p(x) = a x + b x^3 + c x^5 applied to the singular values each step:
- "jordan" (the default): Keller Jordan's fixed quintic (3.4445, -4.7750, 2.0315) at every step, which leaves them
  in ~[0.7, 1.2] and singular values far below the largest still small.
- "polar_express": step t's quintic is the minimax-optimal one for the interval of singular values the earlier steps
  left (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1, with the paper's 1.01 safety factor and
  its 1.01 |G|_F normalisation). Five steps leave the singular values in a narrower band than Jordan's five
  (tests/train/test_polar.py) - which also lifts the directions a gradient barely has, rounding noise included: the
  same step under two parallel layouts differs ~10x more than with Jordan's, and at tiny-* sizes it trained no
  better (docs/quality.md).

Iterations (the same polynomials, so the same result up to rounding):
- plain: X <- a X + (b R + c R^2) X with R = X X^T; s (4 A^2 B + 2 A^3) FLOPs a matrix.
- Gram: X_t = Q_t X_0 with Q_t a polynomial in R_0 = X_0 X_0^T, so the steps run on A x A matrices (R_t and Q_t) and
  touch the A x B matrix only to form R_0 and to apply Q_s at the end; about 4 A^2 B + (8 s - 6) A^3 FLOPs, fewer
  than plain once B > 1.5 A (the expert stacks of tiny-moe are 2 A, a dense FFN 4 A: measured ~15% and ~45% faster
  on a 2-core CPU). Square matrices use the plain iteration, and so does bf16 (see orthogonalise_batch).

The input is normalised in fp32 whatever the parameters' dtype, and the iteration runs in fp32 by default: the same
step taken under another parallel layout (whose gradients differ by summation order) then lands on the same weights
to ~1e-6. In bf16 (`dtype`, `optim.ns_dtype`) it is several times faster where the device multiplies bf16 natively -
GPUs, CPUs with AMX - and reaches the same band of singular values (tests/train/test_polar.py); elsewhere it is far
slower (AVX2: ~35x), so `fast_dtype` picks it only there. Results are returned in fp32. Inputs are never written to,
so an update that is the momentum buffer itself (Muon without Nesterov) is not corrupted by the iteration.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch

Coeffs = Literal["jordan", "polar_express"]

JORDAN = (3.4445, -4.7750, 2.0315)
# Polar Express, degree 5, published for l = 1e-3 (the paper's Algorithm 1); the last quintic repeats after these
_PE_PUBLISHED = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_PE_LAST = (1.875, -1.25, 0.375)
_SAFETY = 1.01  # shrinks each quintic slightly so rounding cannot push a singular value past the next one's range
POLAR_EXPRESS = tuple((a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _PE_PUBLISHED)
GRAM_ASPECT = 1.5  # B / A above which the Gram iteration takes fewer FLOPs (see the module docstring)
CPU_BATCH_BYTES = 4 << 20  # on a CPU, batches of about this much fp32 input (measured: benchmarks/muon_step.py)
DEVICE_BATCH_BYTES = 256 << 20  # on a GPU (not measured yet: benchmarks/gpu_check.sh has no Muon row)


def coefficients(kind: Coeffs, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` steps."""
    if kind == "jordan":
        return [JORDAN] * steps
    return [POLAR_EXPRESS[t] if t < len(POLAR_EXPRESS) else _PE_LAST for t in range(steps)]


def _normalised(x_NAB: torch.Tensor, kind: Coeffs, eps: float = 1e-7) -> torch.Tensor:
    # Polar Express's quintics are optimal for singular values in [l, 1]: its 1.01 keeps the largest below 1
    pad = _SAFETY if kind == "polar_express" else 1.0
    return x_NAB / (x_NAB.norm(dim=(-2, -1), keepdim=True) * pad).clamp_min(eps)


def _plain(x_NAB: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    for a, b, c in coeffs:
        r_NAA = x_NAB @ x_NAB.mT
        p_NAA = torch.baddbmm(r_NAA, r_NAA, r_NAA, beta=b, alpha=c)  # b R + c R^2
        x_NAB = torch.baddbmm(x_NAB, p_NAA, x_NAB, beta=a)  # a X + (b R + c R^2) X
    return x_NAB


def _gram(x_NAB: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    # X_{t+1} = (a I + Z_t) X_t with Z_t = b R_t + c R_t^2, so Q_{t+1} = a Q_t + Q_t Z_t and, R and Z being symmetric
    # and commuting, R_{t+1} = (a I + Z_t) R_t (a I + Z_t) = a (a R_t + R_t Z_t) + Z_t (a R_t + R_t Z_t)
    r_NAA = x_NAB @ x_NAB.mT
    q_NAA: torch.Tensor | None = None
    for t, (a, b, c) in enumerate(coeffs):
        z_NAA = torch.baddbmm(r_NAA, r_NAA, r_NAA, beta=b, alpha=c)
        if q_NAA is None:  # Q_0 = I, so Q_1 = a I + Z_0 without a product
            q_NAA = z_NAA + a * torch.eye(z_NAA.size(-1), dtype=z_NAA.dtype, device=z_NAA.device)
        else:
            q_NAA = torch.baddbmm(q_NAA, q_NAA, z_NAA, beta=a)
        if t < len(coeffs) - 1:  # the last step needs no R
            rz_NAA = torch.baddbmm(r_NAA, r_NAA, z_NAA, beta=a)
            r_NAA = torch.baddbmm(rz_NAA, z_NAA, rz_NAA, beta=a)
    return x_NAB if q_NAA is None else q_NAA @ x_NAB


def fast_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The iteration's dtype for `optim.ns_dtype` on `device`: "auto" is bf16 where bf16 products run natively (CUDA
    with bf16, a CPU with AMX tiles), fp32 elsewhere."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return torch.bfloat16
    return torch.float32


def orthogonalise_batch(
    x_NAB: torch.Tensor, steps: int, kind: Coeffs = "jordan", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(N, A, B) with A <= B -> the same shape, fp32: each matrix's approximate polar factor, iterated in `dtype`. The
    Gram iteration is taken where it is cheaper (B > GRAM_ASPECT A)."""
    coeffs = coefficients(kind, steps)
    x_NAB = _normalised(x_NAB.float(), kind).to(dtype)
    # the Gram iteration never looks at X again and so keeps its rounding errors: in bf16 they grow until singular
    # values far below the largest blow up (ill-conditioned stacks: 1e3); the plain iteration corrects its own
    if dtype == torch.float32 and x_NAB.size(-1) > GRAM_ASPECT * x_NAB.size(-2):
        return _gram(x_NAB, coeffs).float()
    return _plain(x_NAB, coeffs).float()


def orthogonalise(
    mats: list[torch.Tensor], steps: int = 5, kind: Coeffs = "jordan", dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Each tensor (..., A, B) -> its matrices' approximate polar factors (fp32, the same shape), iterated in `dtype`.
    Matrices of one oriented shape - across tensors, layers and experts - are iterated in one batched call, the way an
    expert stack's experts are: the result of each matrix does not depend on its batch-mates."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    oriented: list[torch.Tensor] = []
    for i, m in enumerate(mats):
        x = m.reshape(-1, *m.shape[-2:])
        if x.size(-2) > x.size(-1):
            x = x.mT
        oriented.append(x)
        groups[(tuple(x.shape[-2:]), x.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for idx in groups.values():
        x_NAB = torch.cat([oriented[i] for i in idx])
        # on a CPU a batch whose matrices stay in cache (1.3-1.6x faster than one of 12 MiB); elsewhere batches
        # large enough to fill the device but bounded, so the iteration's working copies stay a fraction of memory
        budget = CPU_BATCH_BYTES if x_NAB.device.type == "cpu" else DEVICE_BATCH_BYTES
        per = max(1, budget // (4 * x_NAB.size(-2) * x_NAB.size(-1)))
        done = torch.cat([orthogonalise_batch(x, steps, kind, dtype) for x in x_NAB.split(per)])
        for i, piece in zip(idx, done.split([oriented[i].size(0) for i in idx]), strict=True):
            m = mats[i]
            out[i] = (piece.mT if m.size(-2) > m.size(-1) else piece).reshape(m.shape)
    return [o for o in out if o is not None]
