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
    to :func:`linears` together, which may stream all their weights in one call; layers of another type that
    offers ``project_many(x, layers)`` (quantized layers) are handed to it together; anything else is called
    one by one.  The outputs come back in the order of ``layers``."""
    if all(type(m) is Linear and m.bias is None for m in layers):
        return linears(x, [m.weight for m in layers])
    out: list[torch.Tensor | None] = [None] * len(layers)
    by_type: dict[type, list[int]] = {}
    for i, m in enumerate(layers):
        by_type.setdefault(type(m), []).append(i)
    for kind, idx in by_type.items():
        group = [layers[i] for i in idx]
        if len(group) > 1 and kind is Linear and all(m.bias is None for m in group):
            ys = linears(x, [m.weight for m in group])
        elif len(group) > 1 and hasattr(kind, "project_many"):
            ys = kind.project_many(x, group)
        else:
            ys = [m(x) for m in group]
        for i, y in zip(idx, ys):
            out[i] = y
    return out  # type: ignore[return-value]


__all__ = ["Linear", "linear", "project"]
