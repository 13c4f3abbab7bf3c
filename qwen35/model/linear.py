"""Linear layers that pick the fastest exact-enough CPU path for bf16 weights.

On x86 CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX), PyTorch emulates bf16 matmuls at a fraction
of its float32 speed.  Three regimes, chosen per call by the number of activation rows:

* few rows (decode steps, small batches): the native kernel (qwen35.kernels, built at first use) streams the
  bf16 weight once, widens it in registers and multiplies in float32 — memory-bound at one row, 2-5x PyTorch;
* many rows (prompt chunks): widen the whole weight to float32 once and use PyTorch's float32 matmul, whose
  cost is then dominated by the arithmetic it does well;
* no native kernel: PyTorch's bf16 matmul below ``UPCAST_MIN_ROWS`` rows, widening above.

Both widened paths accumulate in float32, so they are at least as accurate as the bf16 matmul they replace.
Gradients never take the native path (it has no backward).
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.kernels import MAX_FUSED_WEIGHTS, native

# rows at and above which widening to float32 beats an emulated bf16 matmul (2-core AVX-512 machine, 1 thread:
# bf16 wins below ~24 rows, widening is 1.8x faster at 64 rows and 3x at 256)
UPCAST_MIN_ROWS = 32
# rows below which the native kernel beats widening (same machine; see benchmarks/RESULTS.md)
NATIVE_MAX_ROWS = 48


@functools.cache
def cpu_has_native_bf16() -> bool:
    if platform.system() != "Linux":
        return True  # unknown: keep PyTorch's own choice
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx_vnni_bf16")) or platform.machine() != "x86_64"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_native_bf16():
        rows = x.numel() // max(x.shape[-1], 1)
        if rows < NATIVE_MAX_ROWS and weight.is_contiguous() and not (
                torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            kernels = native()
            if kernels is not None:
                if bias is None and x.dtype in (torch.float32, torch.bfloat16):
                    return kernels.linear_bf16(x, weight, out_dtype=x.dtype)
                y = kernels.linear_bf16(x, weight)
                if bias is not None:
                    y += bias
                return y.to(x.dtype)
        if x.dtype == torch.bfloat16 and rows >= UPCAST_MIN_ROWS:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def project(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` — the projections of one input.  Where every layer is a bias-free bf16
    :class:`Linear` and the native kernel takes x, they run as one call that streams all the weights once
    (outputs are column slices of one tensor); anything else (quantized layers, prefill-sized x, autograd)
    calls each layer."""
    rows = x.numel() // max(x.shape[-1], 1)
    if 1 < len(layers) <= MAX_FUSED_WEIGHTS and rows < NATIVE_MAX_ROWS and x.device.type == "cpu" \
            and x.dtype in (torch.float32, torch.bfloat16) and not cpu_has_native_bf16() \
            and all(type(m) is Linear and m.bias is None and m.weight.dtype == torch.bfloat16
                    and m.weight.is_contiguous() for m in layers) \
            and not (torch.is_grad_enabled() and (x.requires_grad or any(m.weight.requires_grad for m in layers))):
        kernels = native()
        if kernels is not None:
            y = kernels.linear_bf16_many(x, [m.weight for m in layers], out_dtype=x.dtype)
            return list(y.split([m.weight.shape[0] for m in layers], dim=-1))
    return [m(x) for m in layers]
