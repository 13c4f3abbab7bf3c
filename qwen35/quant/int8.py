"""Weight-only int8 with one scale per output row (symmetric, round-to-nearest).

Why: decoding one token reads every weight once, so its speed is the speed of matrix-vector products, and int8
weights are half the bytes of bf16.  The products go through ``qwen35.kernels.ops.linear_int8``: few rows on
the native kernel (dequantised in registers, the weight streamed once), prompt chunks (many rows,
compute-bound) as float32 matmuls on the weight dequantised on the fly.

Error: |w − ŵ| ≤ scale/2 = max|w_row| / 254 per weight, i.e. ≤ 0.4% of the row's largest weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels.ops import grouped_experts, linear_int8, linear_int8_many, swiglu

# tiny projections whose outputs steer everything downstream (decay, write strength, routing): kept exact; and
# the MTP block's input projection, which the official FP8 release also leaves unconverted (model.mtp's decoder
# layer is quantized like the main layers)
KEEP = ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.gate", "shared_expert_gate", "mtp.fc")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (int8 [..., N, K], float32 scale [..., N])."""
    wf = w.float()
    scale = wf.abs().amax(-1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


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
        y = linear_int8(x, self.qweight, self.scale, self.scale_bf16)
        return y if self.bias is None else y + self.bias

    @staticmethod
    def project_many(x: torch.Tensor, layers: list[Int8Linear]) -> list[torch.Tensor]:
        """``[layer(x) for layer in layers]`` (qwen35.model.linear.project): bias-free layers share one native
        call; otherwise each is called."""
        if any(m.bias is not None for m in layers):
            return [m(x) for m in layers]
        return linear_int8_many(x, [(m.qweight, m.scale) for m in layers])


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
        return linear_int8(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e],
                            getattr(self, f"{name}_scale_bf16")[e])

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        return grouped_experts(x, routing.experts, routing.weights, self.n_experts,
                               lambda e, xs: self.project("down_proj", e, _swiglu(self.project("gate_up_proj", e, xs))))


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)  # the float model's own SwiGLU, so both round alike


def replace_modules(model: nn.Module, convert: Callable[[str, nn.Module], Callable[[nn.Module], nn.Module] | None],
                    quantization: str, freeze_tied_embedding: bool = True) -> nn.Module:
    """Every quantization recipe's walk, in place: ``convert(full_name, child)`` gives the factory of the child's
    quantized replacement (None: kept), and the children are replaced one at a time (so the peak is one module's
    float copy over the model).  On a tied model the embedding keeps its own (unquantized) copy of the shared
    matrix, frozen.  Sets ``model.quantization``."""
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            make = convert(f"{name}.{child_name}" if name else child_name, child)
            if make is not None:
                targets.append((module, child_name, make))
    for parent, child_name, make in targets:
        old = getattr(parent, child_name)
        setattr(parent, child_name, make(old))
        del old
    if freeze_tied_embedding and getattr(model.config.text, "tie_word_embeddings", False):
        model.model.embed_tokens.weight.requires_grad_(False)
    model.quantization = quantization
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's large linear layers and expert banks by int8 versions, in place."""
    from ..model.moe import Experts

    def convert(full: str, child: nn.Module):
        if full.startswith("visual"):  # the tower stays in the model's dtype (memory.py counts it so)
            return None
        if isinstance(child, nn.Linear) and not full.endswith(KEEP):
            return Int8Linear
        return Int8Experts if isinstance(child, Experts) else None

    return replace_modules(model, convert, "int8")
