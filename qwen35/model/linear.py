"""Linear layers that pick the fastest exact-enough CPU path for bf16 weights.

On x86 CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX), PyTorch emulates bf16 matmuls at about a
third of its float32 speed.  For a matrix-matrix product (a prompt chunk, a batch of decodes) it is then
faster to widen the weight to float32 on the fly (one pass over the weight) and multiply in float32 — which is
also more accurate.  A matrix-vector product (one decode token) is bound by reading the weight, so it stays in
bf16.  The decision is per call, by the number of rows.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

# rows at and above which widening to float32 beats an emulated bf16 matmul (measured on 2-core AVX-512
# machines, 1 thread: bf16 wins below ~24 rows, widening is 1.8x faster at 64 rows and 3x at 256)
UPCAST_MIN_ROWS = 32


@functools.cache
def cpu_has_native_bf16() -> bool:
    if platform.system() != "Linux":
        return True  # unknown: keep PyTorch's own choice
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx_vnni_bf16")) or platform.machine() != "x86_64"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]
            and not cpu_has_native_bf16()):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
