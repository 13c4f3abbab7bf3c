"""The model's linear layer: ``nn.Linear`` whose product goes through the kernel dispatch (qwen35.kernels.ops),
which picks the fastest exact-enough path for the weight dtype and CPU kind."""

from __future__ import annotations

import torch
from torch import nn

from qwen35.kernels.ops import linear, linears


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def project(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` — the projections of one input.  Bias-free :class:`Linear` layers go
    to :func:`linears` together, which may stream all their weights in one call; anything else (quantized
    layers, biases) calls each layer."""
    if all(type(m) is Linear and m.bias is None for m in layers):
        return linears(x, [m.weight for m in layers])
    return [m(x) for m in layers]


__all__ = ["Linear", "linear", "project"]
