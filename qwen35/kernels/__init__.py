"""Native CPU kernels, compiled at first use with the host C compiler and called through ctypes.

Only what PyTorch lacks on common CPUs lives here: a bf16-weight × float32-activation product for the few-row
matmuls of decoding and a MoE layer's chosen experts (gemm_bf16.c), an in-place decode step of the gated delta
rule on the slot pool (gated_delta_step.c), the layer norms in one pass each (fused_ops.c), decode attention
that reads the paged KV cache in place (paged_attention.c), products with 4-bit weights (int4.c) and
block-FP8 weights (gemm_fp8.c), sharing
bf16.h and the vector layer simd.h; each source says why it exists.  The library is built once per source version, CPU and instruction-set variant
(``$QWEN35_NATIVE_ISA``: native, avx512bf16, avx512, avx2, scalar) into the cache folder (``$QWEN35_CACHE`` or
``~/.cache/qwen35``), then loaded.  Without a compiler, on a CPU it does not fit, or with
``QWEN35_NATIVE_KERNELS=0``, :func:`native` returns ``None`` and callers use PyTorch; nothing requires the
kernels.  Which op runs natively is decided in :mod:`qwen35.kernels.ops`, nowhere else.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("gemm_bf16.c", "gated_delta_step.c", "fused_ops.c",
                                                 "paged_attention.c", "int4.c", "gemm_fp8.c")]
HEADERS = [Path(__file__).with_name(n) for n in ("bf16.h", "simd.h")]
ENV_SWITCH = "QWEN35_NATIVE_KERNELS"


class NativeKernels:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        lib.q35_isa.restype = ctypes.c_char_p
        lib.q35_isa.argtypes = []
        self.isa = lib.q35_isa().decode()
        i64, vp, ci, cf = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._linear_bf16_multi = self._bind(lib.q35_linear_bf16_multi,
                                             [vp, ci, i64, ci, vp, vp, vp, ci, i64, i64, i64, ci])
        self._causal_conv1d_silu = self._bind(lib.q35_causal_conv1d_silu, [vp, ci, vp, vp, vp, vp] + [i64] * 4 + [ci])
        self._deltanet_decode = self._bind(lib.q35_deltanet_decode,
                                           [vp, i64, vp, vp, ci, i64, vp, vp] + [i64] * 5 + [vp] * 3 + [ci])
        self._rms_norm = self._bind(lib.q35_rms_norm, [vp, i64, vp, ci, vp, ci, cf, cf, i64, i64, ci])
        self._gated_rms_norm = self._bind(lib.q35_gated_rms_norm,
                                          [vp, i64, vp, i64, vp, ci, vp, ci, cf, i64, i64, ci])
        self._moe_experts = self._bind(lib.q35_moe_experts, [vp, ci, i64, i64, vp, vp, i64, vp, vp, i64, i64, vp, ci])
        self._linear_int8 = self._bind(lib.q35_linear_int8, [vp, ci, i64, vp, vp, vp, ci, i64, i64, i64, ci])
        self._linear_int8_q8 = self._bind(lib.q35_linear_int8_q8, [vp, ci, i64, vp, vp, vp, ci, i64, i64, i64, ci])
        self._linear_int8_q8_multi = self._bind(lib.q35_linear_int8_q8_multi,
                                                [vp, ci, i64, ci, vp, vp, vp, vp, ci, i64, i64, i64, ci])
        self._linear_fp8 = self._bind(lib.q35_linear_fp8, [vp, ci, i64, vp, vp, i64, i64, vp, ci, i64, i64, i64, ci])
        self._linear_int4 = self._bind(lib.q35_linear_int4, [vp, ci, i64, vp, vp, i64, vp, ci, i64, i64, i64, ci])
        self._linear_int4_q8 = self._bind(lib.q35_linear_int4_q8,
                                          [vp, ci, i64, vp, vp, i64, vp, ci, i64, i64, i64, ci])
        self._linear_int4_q8_multi = self._bind(lib.q35_linear_int4_q8_multi,
                                                [vp, ci, i64, ci, vp, vp, vp, i64, vp, ci, i64, i64, i64, ci])
        self._dequantize_int4 = self._bind(lib.q35_dequantize_int4, [vp, vp, i64, vp, ci, i64, i64, ci])
        self._paged_decode_attention = self._bind(lib.q35_paged_decode_attention,
                                                  [vp, ci, i64, vp, vp, ci, vp, i64, vp] + [i64] * 5 + [cf, vp, ci])
        self._paged_decode_attention_quant = self._bind(
            lib.q35_paged_decode_attention_quant, [vp, ci, i64, vp, vp, ci, vp, vp, vp, i64, vp] + [i64] * 5
            + [cf, vp, ci])
        self._kv_write_quant = self._bind(lib.q35_kv_write_quant, [vp, ci, i64, i64, i64, vp, vp, vp, ci])

    @staticmethod
    def _bind(f, argtypes):
        f.restype = ctypes.c_int
        f.argtypes = argtypes
        return f

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
        """``x @ weight.T`` for a bf16 ``weight`` [N, K] and a float ``x`` [..., K], accumulated in float32 and
        returned as ``out_dtype`` (float32, or bf16 rounded to nearest even)."""
        return self.linear_bf16_many(x, [weight], out_dtype)

    def linear_bf16_many(self, x: torch.Tensor, weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x @ cat(weights).T`` without concatenating them: the outputs of several bf16 weights [N_i, K] that
        read the same ``x`` [..., K], side by side in one [..., ΣN_i] tensor (slice it to split them)."""
        if not 1 <= len(weights) <= MAX_FUSED_WEIGHTS:
            raise ValueError(f"linear_bf16_many takes 1..{MAX_FUSED_WEIGHTS} weights, got {len(weights)}")
        K = x.shape[-1]
        for w in weights:
            if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_contiguous() or w.shape[1] != K:
                raise ValueError(f"linear_bf16 needs contiguous 2-D bf16 weights with {K} columns (the activation's "
                                 f"features), got {w.dtype} {tuple(w.shape)} (contiguous={w.is_contiguous()})")
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"linear_bf16 writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x if x.dtype in (torch.float32, torch.bfloat16) else x.float())
        M = x2.shape[0]
        Ns = [w.shape[0] for w in weights]
        total = sum(Ns)
        y = torch.empty(M, total, dtype=out_dtype)
        if M:
            ptrs = (ctypes.c_void_p * len(weights))(*[w.data_ptr() for w in weights])
            rows = (ctypes.c_int64 * len(weights))(*Ns)
            rc = self._linear_bf16_multi(x2.data_ptr(), int(x2.dtype == torch.bfloat16), x2.stride(0), len(weights),
                                         ptrs, rows, y.data_ptr(), int(out_dtype == torch.bfloat16), total, M, K,
                                         torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_linear_bf16_multi failed ({rc}) for M={M} N={Ns} K={K}")
        return y.reshape(*x.shape[:-1], total)

    def linear_int8(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ (qweight · scale[:, None]).T`` for int8 weights [N, K] with one float32 scale per row: each row
        dequantised exactly as the reference does, multiplied in float32; returned as ``out_dtype`` (default
        x's dtype: float32 or bf16)."""
        return self._int8_product(self._linear_int8, "linear_int8", x, qweight, scale, out_dtype)

    def linear_int8_q8(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """As :meth:`linear_int8`, but each block of 32 activations is first rounded to int8 with a float32 scale
        and the products are summed in integers (gemm_bf16.c says why);
        :func:`qwen35.kernels.ops.linear_int8_q8_reference` defines the result."""
        return self._int8_product(self._linear_int8_q8, "linear_int8_q8", x, qweight, scale, out_dtype)

    def linear_int8_q8_many(self, x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`linear_int8_q8` of several int8 weights (``(qweight, scale)`` pairs) that read the same ``x``:
        their outputs side by side in one [..., ΣN_i] tensor, each value as the one-weight call gives it."""
        if not 1 <= len(weights) <= MAX_FUSED_WEIGHTS:
            raise ValueError(f"linear_int8_q8_many takes 1..{MAX_FUSED_WEIGHTS} weights, got {len(weights)}")
        _check_float(x)
        K = x.shape[-1]
        Ns = [self._check_int8("linear_int8_q8_many", q, s, K) for q, s in weights]
        weights = [(q, s.contiguous()) for q, s in weights]
        out_dtype = out_dtype or x.dtype
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"linear_int8_q8_many writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x)
        total = sum(Ns)
        y = torch.empty(x2.shape[0], total, dtype=out_dtype)
        if x2.shape[0] and total:
            n, qs, ss, rows = _weight_arrays(weights, Ns)
            rc = self._linear_int8_q8_multi(x2.data_ptr(), _bf(x2), x2.stride(0), n, qs, ss, rows, y.data_ptr(),
                                            int(out_dtype == torch.bfloat16), total, x2.shape[0], K,
                                            torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_linear_int8_q8_multi failed ({rc}) for M={x2.shape[0]} N={Ns} K={K}")
        return y.reshape(*x.shape[:-1], total)

    @staticmethod
    def _check_int8(name: str, qweight: torch.Tensor, scale: torch.Tensor, K: int) -> int:
        """The output rows N of a contiguous int8 weight [N, K] with float32 scales [N]; ValueError otherwise."""
        N = qweight.shape[0] if qweight.dim() == 2 else 0
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or not qweight.is_contiguous() or qweight.shape[1] != K \
                or scale.shape != (N,) or scale.dtype != torch.float32:
            raise ValueError(f"{name} needs contiguous int8 weights [N, {K}] and float32 scales [N], "
                             f"got {qweight.dtype} {tuple(qweight.shape)} and {scale.dtype} {tuple(scale.shape)}")
        return N

    def _int8_product(self, fn, name: str, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      out_dtype: torch.dtype | None) -> torch.Tensor:
        _check_float(x)
        K = x.shape[-1]
        N = self._check_int8(name, qweight, scale, K)
        out_dtype = out_dtype or x.dtype
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x)
        y = torch.empty(x2.shape[0], N, dtype=out_dtype)
        if x2.shape[0] and N:
            scale = scale.contiguous()
            rc = fn(x2.data_ptr(), _bf(x2), x2.stride(0), qweight.data_ptr(), scale.data_ptr(), y.data_ptr(),
                    int(out_dtype == torch.bfloat16), x2.shape[0], N, K, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_{name} failed ({rc}) for M={x2.shape[0]} N={N} K={K}")
        return y.reshape(*x.shape[:-1], N)

    def linear_fp8(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ (weight · scale_inv).T`` for a block-FP8 weight (float8_e4m3fn [N, K], float32 ``scale_inv``
        [ceil(N/bn), ceil(K/bk)] for ``block`` = (bn, bk)): each value dequantized exactly as
        ``ops.dequantize_fp8_blocks`` does, multiplied in float32 (gemm_fp8.c); returned as ``out_dtype``
        (default x's dtype: float32 or bf16)."""
        _check_float(x)
        bn, bk = int(block[0]), int(block[1])
        N, K = weight.shape if weight.dim() == 2 else (0, 0)
        want = (-(-N // bn), -(-K // bk)) if bn > 0 and bk > 0 else None
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or not weight.is_contiguous() \
                or K != x.shape[-1] or want is None or tuple(scale_inv.shape) != want \
                or scale_inv.dtype != torch.float32:
            raise ValueError(f"linear_fp8 needs a contiguous float8_e4m3fn weight [N, {x.shape[-1]}] and float32 "
                             f"scales [ceil(N/{bn}), ceil(K/{bk})], got {weight.dtype} {tuple(weight.shape)} and "
                             f"{scale_inv.dtype} {tuple(scale_inv.shape)}")
        out_dtype = out_dtype or x.dtype
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"linear_fp8 writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x)
        y = torch.empty(x2.shape[0], N, dtype=out_dtype)
        if x2.shape[0]:
            scale_inv = scale_inv.contiguous()
            rc = self._linear_fp8(x2.data_ptr(), _bf(x2), x2.stride(0), weight.data_ptr(), scale_inv.data_ptr(),
                                  bn, bk, y.data_ptr(), int(out_dtype == torch.bfloat16), x2.shape[0], N, K,
                                  torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_linear_fp8 failed ({rc}) for M={x2.shape[0]} N={N} K={K}")
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def _check_int4(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int) -> int:
        """The output rows N of a packed 4-bit weight (qwen35/quant/int4.py), after checking its layout."""
        if group_size < 32 or group_size & (group_size - 1):
            raise ValueError(f"int4 group size must be a power of two >= 32, got {group_size}")
        span = max(group_size, 64)  # rows are stored in whole 64-weight blocks and whole groups
        groups = -(-in_features // span) * span // group_size if in_features > 0 else 0
        N = qweight.shape[0] if qweight.dim() == 2 else -1
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or not qweight.is_contiguous() or groups == 0 \
                or qweight.shape[1] != groups * group_size // 2 or scales.dtype != torch.bfloat16 \
                or scales.shape != (N, groups) or not scales.is_contiguous():
            raise ValueError(f"int4 weights of {in_features} inputs in groups of {group_size} need contiguous uint8 "
                             f"[N, {groups * group_size // 2}] and bf16 scales [N, {groups}], got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {scales.dtype} {tuple(scales.shape)}")
        return N

    def linear_int4(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                    group_size: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ ŵ.T`` for a packed 4-bit weight (uint8 [N, Kp/2], bf16 ``scales`` [N, Kp/group_size]; ŵ as
        :func:`qwen35.kernels.ops.dequantize_int4_reference` defines it), multiplied in float32; returned as
        ``out_dtype`` (default x's dtype: float32 or bf16)."""
        return self._int4_product(self._linear_int4, "linear_int4", x, qweight, scales, in_features, group_size,
                                  out_dtype)

    def linear_int4_q8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                       group_size: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """As :meth:`linear_int4`, but each block of 32 activations is first rounded to int8 with a float32
        scale and the products are summed in integers (int4.c says why: the one-row product is then no longer
        bound by widening nibbles); :func:`qwen35.kernels.ops.linear_int4_q8_reference` defines the result."""
        return self._int4_product(self._linear_int4_q8, "linear_int4_q8", x, qweight, scales, in_features,
                                  group_size, out_dtype)

    def linear_int4_q8_many(self, x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            in_features: int, group_size: int, out_dtype: torch.dtype | None = None
                            ) -> torch.Tensor:
        """:meth:`linear_int4_q8` of several packed weights (``(qweight, scales)`` pairs of one group size) that
        read the same ``x``: their outputs side by side in one [..., ΣN_i] tensor (slice it to split them), each
        value as the one-weight call gives it; the activations are rounded once for all."""
        if not 1 <= len(weights) <= MAX_FUSED_WEIGHTS:
            raise ValueError(f"linear_int4_q8_many takes 1..{MAX_FUSED_WEIGHTS} weights, got {len(weights)}")
        _check_float(x)
        if x.shape[-1] != in_features:
            raise ValueError(f"linear_int4_q8_many: activations have {x.shape[-1]} features, the weights "
                             f"{in_features}")
        Ns = [self._check_int4(q, s, in_features, group_size) for q, s in weights]
        out_dtype = out_dtype or x.dtype
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"linear_int4_q8_many writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x)
        total = sum(Ns)
        y = torch.empty(x2.shape[0], total, dtype=out_dtype)
        if x2.shape[0] and total:
            n, qs, ss, rows = _weight_arrays(weights, Ns)
            rc = self._linear_int4_q8_multi(x2.data_ptr(), _bf(x2), x2.stride(0), n, qs, ss, rows, group_size,
                                            y.data_ptr(), int(out_dtype == torch.bfloat16), total, x2.shape[0],
                                            in_features, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_linear_int4_q8_multi failed ({rc}) for M={x2.shape[0]} N={Ns} "
                                   f"K={in_features}")
        return y.reshape(*x.shape[:-1], total)

    def _int4_product(self, fn, name: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      in_features: int, group_size: int, out_dtype: torch.dtype | None) -> torch.Tensor:
        _check_float(x)
        if x.shape[-1] != in_features:
            raise ValueError(f"{name}: activations have {x.shape[-1]} features, the weight {in_features}")
        N = self._check_int4(qweight, scales, in_features, group_size)
        out_dtype = out_dtype or x.dtype
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{name} writes float32 or bfloat16, not {out_dtype}")
        x2 = _rows(x)
        y = torch.empty(x2.shape[0], N, dtype=out_dtype)
        if x2.shape[0] and N:
            rc = fn(x2.data_ptr(), _bf(x2), x2.stride(0), qweight.data_ptr(), scales.data_ptr(), group_size,
                    y.data_ptr(), int(out_dtype == torch.bfloat16), x2.shape[0], N, in_features,
                    torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_{name} failed ({rc}) for M={x2.shape[0]} N={N} K={in_features}")
        return y.reshape(*x.shape[:-1], N)

    def dequantize_int4(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The packed 4-bit weight as a [N, in_features] float32 matrix (exact), or bf16 (rounded to nearest)."""
        N = self._check_int4(qweight, scales, in_features, group_size)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dequantize_int4 writes float32 or bfloat16, not {dtype}")
        out = torch.empty(N, in_features, dtype=dtype)
        if N:
            rc = self._dequantize_int4(qweight.data_ptr(), scales.data_ptr(), group_size, out.data_ptr(),
                                       int(dtype == torch.bfloat16), N, in_features, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_dequantize_int4 failed ({rc}) for N={N} K={in_features}")
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        """``x · rsqrt(mean(x²) + eps) · (offset + weight)`` over the last dim, float32 inside, x's dtype out."""
        x2 = _rows(x)
        D = x2.shape[1]
        _check_float(x2, weight)
        if weight.shape != (D,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match {D} features")
        y = torch.empty(x2.shape, dtype=x.dtype)
        weight = weight.contiguous()
        self._call(self._rms_norm, x2.data_ptr(), x2.stride(0), y.data_ptr(), _bf(x2), weight.data_ptr(),
                   _bf(weight), offset, eps, x2.shape[0], D, torch.get_num_threads())
        return y.view(x.shape)

    def gated_rms_norm(self, o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``(weight · norm(o)) · SiLU(z)`` per row of the last dim (the DeltaNet output norm); o, z same dtype."""
        o2, z2 = _rows(o), _rows(z)
        D = o2.shape[1]
        _check_float(o2, weight)
        if z2.shape != o2.shape or z.dtype != o.dtype or weight.shape != (D,):
            raise ValueError(f"gated_rms_norm: o {tuple(o.shape)} {o.dtype}, z {tuple(z.shape)} {z.dtype}, "
                             f"weight {tuple(weight.shape)} do not match")
        y = torch.empty(o2.shape, dtype=o.dtype)
        weight = weight.contiguous()
        self._call(self._gated_rms_norm, o2.data_ptr(), o2.stride(0), z2.data_ptr(), z2.stride(0), y.data_ptr(),
                   _bf(o2), weight.data_ptr(), _bf(weight), eps, o2.shape[0], D, torch.get_num_threads())
        return y.view(o.shape)

    def moe_experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
        """The routed experts of a sparse-MoE layer: for each token of x [M, H], the sum over its k chosen experts
        (ids ``experts`` [M, k], weights [M, k]) of weight · down_e(SiLU(gate_e x) · up_e x), with gate_up
        [E, 2I, H] (gate rows first) and down [E, H, I] in bf16.  Returns [M, H] in x's dtype."""
        _check_float(x)
        if x.dim() != 2 or experts.shape != weights.shape or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
            raise ValueError(f"moe_experts: x {tuple(x.shape)}, experts {tuple(experts.shape)} and weights "
                             f"{tuple(weights.shape)} do not match")
        E, I2, H = gate_up.shape
        if gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16 or down.shape != (E, H, I2 // 2) \
                or H != x.shape[1] or I2 % 2 or not (gate_up.is_contiguous() and down.is_contiguous()):
            raise ValueError(f"moe_experts: needs contiguous bf16 gate_up [E, 2I, {x.shape[1]}] and down [E, "
                             f"{x.shape[1]}, I], got {gate_up.dtype} {tuple(gate_up.shape)} and {down.dtype} "
                             f"{tuple(down.shape)}")
        if experts.shape[1] > 64:
            raise ValueError(f"moe_experts: at most 64 experts per token, got {experts.shape[1]}")
        x = x.contiguous()
        experts = experts.to(torch.int64).contiguous()
        weights = weights.to(x.dtype).contiguous()
        y = torch.empty_like(x)
        if x.shape[0]:
            rc = self._moe_experts(x.data_ptr(), _bf(x), x.shape[0], H, experts.data_ptr(), weights.data_ptr(),
                                   experts.shape[1], gate_up.data_ptr(), down.data_ptr(), E, I2 // 2, y.data_ptr(),
                                   torch.get_num_threads())
            if rc == -1:
                raise ValueError(f"moe_experts: an expert id is outside 0..{E - 1}")
            if rc != 0:
                raise RuntimeError(f"q35_moe_experts failed ({rc})")
        return y

    @staticmethod
    def _call(f, *args) -> None:
        rc = f(*args)
        if rc != 0:
            raise RuntimeError(f"{f.__name__} failed ({rc})")

    def causal_conv1d_silu(self, x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """SiLU(causal depthwise conv) of a chunk of tokens, token-major: x [B, T, C], weight [C, 1, K] (or
        [C, K]), window [B, C, K-1] (the inputs before the chunk; None = zeros), all float32 or all bf16.  Returns
        the activations [B, T, C] and the new window [B, C, K-1] (the last K-1 inputs), in x's dtype."""
        if x.dim() != 3:
            raise ValueError(f"causal_conv1d_silu takes x [B, T, C], got {tuple(x.shape)}")
        B, T, C = x.shape
        K = weight.shape[-1]
        tensors = [x, weight] + ([] if window is None else [window])
        if len({t.dtype for t in tensors}) != 1 or x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("causal_conv1d_silu: x, weight and window must share float32 or bf16, got "
                             f"{sorted(str(t.dtype) for t in tensors)}")
        if weight.numel() != C * K or not 1 <= K <= 16 or (window is not None and window.shape != (B, C, K - 1)):
            raise ValueError(f"causal_conv1d_silu: inconsistent shapes x {tuple(x.shape)} weight "
                             f"{tuple(weight.shape)} window {None if window is None else tuple(window.shape)}")
        x, weight = x.contiguous(), weight.contiguous()
        window = None if window is None else window.contiguous()
        y = torch.empty_like(x)
        new_window = torch.empty(B, C, K - 1, dtype=x.dtype)
        if B and T:
            rc = self._causal_conv1d_silu(x.data_ptr(), _bf(x), None if window is None else window.data_ptr(),
                                          weight.data_ptr(), y.data_ptr(), new_window.data_ptr(), B, T, C, K,
                                          torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_causal_conv1d_silu failed ({rc}) for x {tuple(x.shape)} K={K}")
        return y, new_window

    def deltanet_decode_(self, qkv: torch.Tensor, conv_weight: torch.Tensor, windows: torch.Tensor,
                         states: torch.Tensor, slots: torch.Tensor, n_k: int, g: torch.Tensor, beta: torch.Tensor
                         ) -> torch.Tensor:
        """Conv (+ window update), L2 norms and the gated delta step of one decode token for n sequences, in
        place on rows ``slots`` of the pools.  qkv [n, C]; conv_weight [C, 1, Kc]; windows [P, C, Kc-1] — all
        three float32 or all bf16; states [P, Hv, dk, dv] float32; g, beta [n, Hv].  Returns o [n, Hv, dv]
        float32."""
        P, Hv, dk, dv = states.shape
        n, C = qkv.shape
        Kc = conv_weight.shape[-1]
        dtypes = {qkv.dtype, conv_weight.dtype, windows.dtype}
        if len(dtypes) != 1 or qkv.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"deltanet_decode_: qkv, conv weight and windows must share float32 or bf16, got "
                             f"{sorted(map(str, dtypes))}")
        if states.dtype != torch.float32 or not (states.is_contiguous() and windows.is_contiguous()):
            raise ValueError("deltanet_decode_ needs contiguous pools and float32 states")
        if C != 2 * n_k * dk + Hv * dv or windows.shape != (P, C, Kc - 1) or conv_weight.numel() != C * Kc \
                or g.shape != (n, Hv) or beta.shape != (n, Hv) or slots.shape != (n,) or not 1 <= Kc <= 16:
            raise ValueError(f"deltanet_decode_: inconsistent shapes qkv {tuple(qkv.shape)} conv "
                             f"{tuple(conv_weight.shape)} windows {tuple(windows.shape)} states "
                             f"{tuple(states.shape)} g {tuple(g.shape)} beta {tuple(beta.shape)} slots "
                             f"{tuple(slots.shape)} with {n_k} key heads")
        slots = slots.to(torch.int64).contiguous()
        if n and (int(slots.min()) < 0 or int(slots.max()) >= P):
            raise ValueError(f"deltanet_decode_: slot index out of range 0..{P - 1}")
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        conv_weight = conv_weight.contiguous()
        g, beta = g.to(torch.float32).contiguous(), beta.to(torch.float32).contiguous()
        out = torch.empty(n, Hv, dv, dtype=torch.float32)
        if n:
            rc = self._deltanet_decode(qkv.data_ptr(), qkv.stride(0), conv_weight.data_ptr(), windows.data_ptr(),
                                       int(qkv.dtype == torch.bfloat16), Kc, states.data_ptr(), slots.data_ptr(),
                                       n, n_k, Hv, dk, dv, g.data_ptr(), beta.data_ptr(), out.data_ptr(),
                                       torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_deltanet_decode failed ({rc})")
        return out


    def paged_decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float
                               ) -> torch.Tensor:
        """One decode query per sequence over its paged history, read in place: q [n, H, d]; keys / values
        the flat pools [R, Hkv, d]; tables [n, max_blocks] int64 block ids; lengths [n] keys per sequence.
        Returns o [n, H, d] in q's dtype (softmax(q·kᵀ·scale)·v, float32 inside)."""
        _check_float(q, keys, values)
        n, H, d = q.shape
        R, Hkv, dk = keys.shape
        if values.shape != keys.shape or dk != d or H % Hkv or keys.dtype != values.dtype \
                or not (keys.is_contiguous() and values.is_contiguous()):
            raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} and contiguous pools of one dtype "
                             f"[R, Hkv, {d}] needed, got keys {tuple(keys.shape)} {keys.dtype}, values "
                             f"{tuple(values.shape)} {values.dtype}")
        if tables.dim() != 2 or tables.shape[0] != n or lengths.shape != (n,):
            raise ValueError(f"paged_decode_attention: tables {tuple(tables.shape)} / lengths "
                             f"{tuple(lengths.shape)} do not match {n} sequences")
        tables = tables.to(torch.int64).contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        if n and (int(tables.min()) < 0 or int(tables.max()) * block_size >= R):
            raise ValueError(f"paged_decode_attention: a block id is outside the pool of {R // block_size} blocks")
        if q.stride(-1) != 1 or q.stride(1) != d:
            q = q.contiguous()
        out = torch.empty(n, H, d, dtype=q.dtype)
        if n:
            rc = self._paged_decode_attention(q.data_ptr(), _bf(q), q.stride(0), keys.data_ptr(), values.data_ptr(),
                                              _bf(keys), tables.data_ptr(), tables.shape[1], lengths.data_ptr(), n,
                                              H, Hkv, d, block_size, scale, out.data_ptr(), torch.get_num_threads())
            if rc == -1:
                raise ValueError(f"paged_decode_attention: lengths must be 1..{tables.shape[1] * block_size}")
            if rc != 0:
                raise RuntimeError(f"q35_paged_decode_attention failed ({rc})")
        return out

    def kv_write_quant(self, pool: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize keys or values x [n, Hkv, d] (float32 or bf16) into rows ``rows`` [n] of an int8 or
        float8_e4m3fn pool [R, Hkv, d] and their scales into ``scales`` [R, Hkv] float32, in place, with the
        bytes :func:`qwen35.kernels.ops.quantize_kv` gives."""
        _check_float(x)
        kinds = {torch.int8: 2, torch.float8_e4m3fn: 3}
        if pool.dtype not in kinds or pool.dim() != 3 or not pool.is_contiguous() or x.dim() != 3 \
                or tuple(x.shape[1:]) != tuple(pool.shape[1:]):
            raise ValueError(f"kv_write_quant: x [n, Hkv, d] and a contiguous int8 / float8_e4m3fn pool [R, Hkv, d] "
                             f"needed, got x {tuple(x.shape)} and pool {pool.dtype} {tuple(pool.shape)}")
        R, Hkv, d = pool.shape
        if scales.dtype != torch.float32 or scales.shape != (R, Hkv) or not scales.is_contiguous():
            raise ValueError(f"kv_write_quant: scales must be contiguous float32 [{R}, {Hkv}], got {scales.dtype} "
                             f"{tuple(scales.shape)}")
        n = x.shape[0]
        rows = rows.to(torch.int64).contiguous()
        if rows.shape != (n,):
            raise ValueError(f"kv_write_quant: {n} rows of x need {n} pool rows, got {tuple(rows.shape)}")
        if n == 0:
            return
        if int(rows.min()) < 0 or int(rows.max()) >= R:
            raise ValueError(f"kv_write_quant: a pool row is outside 0..{R - 1}")
        x = x.contiguous()
        rc = self._kv_write_quant(x.data_ptr(), _bf(x), n, Hkv, d, rows.data_ptr(), pool.data_ptr(),
                                  scales.data_ptr(), kinds[pool.dtype])
        if rc != 0:
            raise RuntimeError(f"q35_kv_write_quant failed ({rc})")

    def paged_decode_attention_quant(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     key_scales: torch.Tensor, value_scales: torch.Tensor, tables: torch.Tensor,
                                     lengths: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
        """:meth:`paged_decode_attention` over a quantized KV cache: keys / values int8 or float8_e4m3fn pools
        [R, Hkv, d], each row dequantized as stored · its float32 scale (``key_scales`` / ``value_scales``
        [R, Hkv]) in registers as it is read.  Returns o [n, H, d] in q's dtype."""
        _check_float(q)
        kinds = {torch.int8: 2, torch.float8_e4m3fn: 3}
        n, H, d = q.shape
        R, Hkv, dk = keys.shape
        if keys.dtype not in kinds or values.dtype != keys.dtype or values.shape != keys.shape or dk != d \
                or H % Hkv or not (keys.is_contiguous() and values.is_contiguous()):
            raise ValueError(f"paged_decode_attention_quant: q {tuple(q.shape)} and contiguous int8 or "
                             f"float8_e4m3fn pools of one dtype [R, Hkv, {d}] needed, got keys {tuple(keys.shape)} "
                             f"{keys.dtype}, values {tuple(values.shape)} {values.dtype}")
        for s in (key_scales, value_scales):
            if s.dtype != torch.float32 or s.shape != (R, Hkv) or not s.is_contiguous() or s.device.type != "cpu":
                raise ValueError(f"paged_decode_attention_quant: scales must be contiguous float32 [{R}, {Hkv}] on "
                                 f"the CPU, got {s.dtype} {tuple(s.shape)}")
        if tables.dim() != 2 or tables.shape[0] != n or lengths.shape != (n,):
            raise ValueError(f"paged_decode_attention_quant: tables {tuple(tables.shape)} / lengths "
                             f"{tuple(lengths.shape)} do not match {n} sequences")
        tables = tables.to(torch.int64).contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        if n and (int(tables.min()) < 0 or int(tables.max()) * block_size >= R):
            raise ValueError(f"paged_decode_attention_quant: a block id is outside the pool of {R // block_size} "
                             "blocks")
        if q.stride(-1) != 1 or q.stride(1) != d:
            q = q.contiguous()
        out = torch.empty(n, H, d, dtype=q.dtype)
        if n:
            rc = self._paged_decode_attention_quant(q.data_ptr(), _bf(q), q.stride(0), keys.data_ptr(),
                                                    values.data_ptr(), kinds[keys.dtype], key_scales.data_ptr(),
                                                    value_scales.data_ptr(), tables.data_ptr(), tables.shape[1],
                                                    lengths.data_ptr(), n, H, Hkv, d, block_size, scale,
                                                    out.data_ptr(), torch.get_num_threads())
            if rc == -1:
                raise ValueError(f"paged_decode_attention_quant: lengths must be 1..{tables.shape[1] * block_size}")
            if rc != 0:
                raise RuntimeError(f"q35_paged_decode_attention_quant failed ({rc})")
        return out


MAX_FUSED_WEIGHTS = 8  # gemm_bf16.c MAX_WEIGHTS


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the last dim (a view when possible: column slices of a
    fused output stay in place, their row stride goes to the kernel)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


def _weight_arrays(weights: Sequence[tuple[torch.Tensor, torch.Tensor]], Ns: list[int]):
    """(count, weight pointers, scale pointers, output rows) of (weight, scales) pairs, as the *_multi kernels
    take them."""
    n = len(weights)
    return (n, (ctypes.c_void_p * n)(*[q.data_ptr() for q, _ in weights]),
            (ctypes.c_void_p * n)(*[s.data_ptr() for _, s in weights]), (ctypes.c_int64 * n)(*Ns))


def _bf(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def _check_float(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in (torch.float32, torch.bfloat16) or t.device.type != "cpu":
            raise ValueError(f"native kernels take float32 or bf16 CPU tensors, got {t.dtype} on {t.device}")


_lock = threading.Lock()
_loaded: NativeKernels | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("QWEN35_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen35"


def _cpu_signature() -> str:
    # -march=native output depends on the CPU: key the build on its model and flags
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Instruction-set variants of the library.  "native" (-march=native) is what runs by default; the others are the
# fixed x86-64 levels the sources have code paths for, so that every path can be built and tested on any host
# that runs it (an AVX-512 machine tests its avx512, avx2 and scalar code; an AVX2 machine the last two).
ISA_VARIANTS: dict[str, list[str]] = {
    "native": ["-march=native"],
    # AVX-512 with its bf16 and int8 dot products (vdpbf16ps, vpdpbusd): every CPU with AVX512-BF16 (Cooper Lake,
    # Sapphire Rapids and later Xeons, AMD Zen 4 and later) also has AVX512-VNNI
    "avx512bf16": ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"],
    "avx512": ["-march=x86-64-v4"],  # AVX-512 F/BW/CD/DQ/VL
    "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C, BMI2
    "scalar": ["-march=x86-64"],  # SSE2 only: the portable C loops
}
_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_ISA_NEEDS = {"avx512bf16": _AVX512 | {"avx512_bf16", "avx512_vnni"}, "avx512": _AVX512, "avx2": {"avx2", "fma", "f16c"},
              "scalar": set(), "native": set()}
ISA_SWITCH = "QWEN35_NATIVE_ISA"


def runnable_isas() -> list[str]:
    """The variants this host can execute, best first (``native`` first of all)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _cpu_flags()
    return [isa for isa in ISA_VARIANTS if _ISA_NEEDS[isa] <= flags]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(force: bool = False, isa: str = "native") -> Path:
    """Compile the library for one instruction-set variant into the cache folder (atomically) and return its
    path; raises on failure."""
    if isa not in ISA_VARIANTS:
        raise ValueError(f"unknown instruction-set variant {isa!r}; one of {', '.join(ISA_VARIANTS)}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", *ISA_VARIANTS[isa], "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join([cc, *flags]).encode()
                         + _cpu_signature().encode())
    name = f"qwen35_kernels_{isa}_{key.hexdigest()[:16]}.so"
    out = cache_dir() / "kernels" / name
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(out.parent)
    except OSError:  # a read-only home: build where this user can write
        out = Path(tempfile.gettempdir()) / f"qwen35-{os.getuid()}" / "kernels" / name
        if out.exists() and not force:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp_out), "-lm"], capture_output=True,
                              check=False, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build the native kernels:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)  # other processes see either no library or a whole one
    return out


def requested_isa() -> str:
    """The variant ``$QWEN35_NATIVE_ISA`` asks for (default ``native``); a bad name is an error naming it."""
    isa = os.environ.get(ISA_SWITCH, "native").strip().lower() or "native"
    if isa not in ISA_VARIANTS:
        raise ValueError(f"{ISA_SWITCH}={isa!r} is not a kernel variant; use one of {', '.join(ISA_VARIANTS)}")
    return isa


def native() -> NativeKernels | None:
    """The kernels, built and loaded on first call; ``None`` where they are off or cannot be built."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        isa = requested_isa()
        if os.environ.get(ENV_SWITCH, "1") in ("0", "false", "off", "no"):
            log.info("native kernels disabled by %s", ENV_SWITCH)
        elif platform.machine() not in ("x86_64", "AMD64"):
            log.info("native kernels are written for x86-64; using PyTorch on %s", platform.machine())
        elif isa not in runnable_isas():
            raise ValueError(f"{ISA_SWITCH}={isa} asks for kernels this CPU cannot run (it runs "
                             f"{', '.join(runnable_isas())})")
        else:
            try:
                path = build(isa=isa)
                _loaded = NativeKernels(ctypes.CDLL(str(path)), path)
            except (RuntimeError, OSError) as e:
                log.warning("native kernels unavailable, using PyTorch: %s", e)
        _tried = True
        return _loaded


def reset() -> None:
    """Forget the loaded library and the CPU-kind decision so the next call looks again (tests flip the
    switches)."""
    global _loaded, _tried
    with _lock:
        _loaded, _tried = None, False
    from . import ops  # noqa: PLC0415  (ops imports this module)

    ops.cpu_kind.cache_clear()


__all__ = ["ENV_SWITCH", "ISA_SWITCH", "ISA_VARIANTS", "MAX_FUSED_WEIGHTS", "NativeKernels", "build", "cache_dir",
           "native", "requested_isa", "reset", "runnable_isas"]
