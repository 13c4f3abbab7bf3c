"""Weight-only int8 with one scale per output row (symmetric, round-to-nearest).

Why: decoding one token reads every weight once, so its speed is the speed of matrix-vector products.  On
CPUs without native bf16, PyTorch's bf16 GEMV converts as it goes and reads ~1.5 G weights/s per core, while
its int8 weight kernel (``aten._weight_int8pack_mm``, bf16 activations) reads ~7 G/s: the same model decodes
several times faster at half the weight memory.  Prompt chunks (many rows) are compute-bound instead and run
as float32 matmuls on weights widened on the fly.

Error: |w − ŵ| ≤ scale/2 = max|w_row| / 254 per weight, i.e. ≤ 0.4% of the row's largest weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.ops import grouped_experts, swiglu

# up to this many rows per call the int8 kernel wins (1 thread: 7x faster than bf16 at 1 row, 2.9x at 16, on par
# with widening at ~48); above it, widen to float32 and use the matmul kernel
INT8_KERNEL_MAX_ROWS = 48

# tiny projections whose outputs steer everything downstream (decay, write strength, routing): kept exact
KEEP = ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.gate", "shared_expert_gate")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (int8 [..., N, K], float32 scale [..., N])."""
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if x.dtype == torch.bfloat16 and rows <= INT8_KERNEL_MAX_ROWS and x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x2.contiguous(), q, scale_bf16)
    else:
        y = F.linear(x2.float(), q.float() * scale[:, None]).to(x.dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_linear(x, self.qweight, self.scale, self.scale_bf16)
        return y if self.bias is None else y + self.bias


class Int8Experts(nn.Module):
    """Drop-in for ``qwen35.model.moe.Experts`` with int8 expert weights."""

    def __init__(self, experts) -> None:
        super().__init__()
        self.n_experts, self.intermediate = experts.n_experts, experts.intermediate
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_rows(getattr(experts, name).detach())
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)
            self.register_buffer(f"{name}_scale_bf16", scale.to(torch.bfloat16))

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return _int8_linear(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e],
                            getattr(self, f"{name}_scale_bf16")[e])

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        return grouped_experts(x, routing.experts, routing.weights, self.n_experts,
                               lambda e, xs: self.project("down_proj", e, _swiglu(self.project("gate_up_proj", e, xs))))


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)  # the float model's own SwiGLU, so both round alike


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's large linear layers and expert banks by int8 versions, in place."""
    from ..model.moe import Experts

    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.endswith(KEEP):
                targets.append((module, child_name, Int8Linear))
            elif isinstance(child, Experts):
                targets.append((module, child_name, Int8Experts))
    tied = getattr(model.config.text, "tie_word_embeddings", False)
    for parent, child_name, cls in targets:
        old = getattr(parent, child_name)
        new = cls(old)
        setattr(parent, child_name, new)
        del old
    if tied:  # the embedding keeps its own (unquantized) copy of the shared matrix
        model.model.embed_tokens.weight.requires_grad_(False)
    model.quantization = "int8"
    return model
