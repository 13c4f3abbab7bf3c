"""The two RMSNorms of Qwen3.5.

Every decoder norm (input, post-attention, final, q/k per head, MTP) is *zero-centred*: the stored weight w
is an offset, applied as (1 + w), so a freshly initialised norm (w = 0) is the identity scale.  The norm
inside the DeltaNet output is *not* zero-centred and is gated by SiLU(z).  Both normalise in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.kernels.ops import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """y = x · rsqrt(mean(x²) + eps) · (1 + w), computed in float32 then cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=1.0)


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
        return gated_rms_norm(x, z, self.weight, self.eps)
