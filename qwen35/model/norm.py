"""The two RMSNorms of Qwen3.5.

Every decoder norm (input, post-attention, final, q/k per head, MTP) is *zero-centred*: the stored weight w
is an offset, applied as (1 + w), so a freshly initialised norm (w = 0) is the identity scale.  The norm
inside the DeltaNet output is *not* zero-centred and is gated by SiLU(z).  Both normalise in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.kernels import SMALL_NORM_ELEMENTS, SMALL_OP_ELEMENTS, native_for


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · (1 + w), computed in float32 then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = native_for(x, self.weight, max_elements=SMALL_NORM_ELEMENTS)
        if kernels is not None:  # the same arithmetic in one pass (qwen35/kernels/fused_ops.c)
            return kernels.rms_norm(x, self.weight, self.eps, offset=1.0)
        # F.rms_norm is one fused op (x · rsqrt(mean(x²) + eps)): fewer passes and far less per-call overhead
        # than spelling it out, which matters at one decode token per step
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """y = w · norm(x) · SiLU(z): plain weight (init 1), gate in float32.

    The normalised x is cast to the activation dtype before the weight multiplies it, as the reference does;
    in float32 this changes nothing, in bf16 it keeps bit-level agreement.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        kernels = native_for(x, z, self.weight, max_elements=SMALL_OP_ELEMENTS) if x.dtype == z.dtype else None
        if kernels is not None:  # the same arithmetic and roundings in one pass
            return kernels.gated_rms_norm(x, z, self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        y = self.weight * y
        return (y * F.silu(z.float())).to(x.dtype)
