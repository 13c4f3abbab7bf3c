"""The model's operations that have a native twin, and the one place that decides which of the two runs.

Each op here is three things behind one signature:

* a PyTorch **reference** (``*_reference``): the definition of the op, used wherever the native kernel does not
  apply, and the oracle of the tests;
* **eligibility**: whether the native kernel may take these tensors (CPU, float32 / bf16, no gradient to carry
  — the kernels have no backward — and the size limits of this CPU kind in :data:`LIMITS`);
* the **native call** (:class:`qwen35.kernels.NativeKernels`).

The model files call these ops and read as math; nothing outside this module looks at the CPU kind.

CPU kind.  x86 CPUs come in two kinds as far as bf16 goes.  With native bf16 arithmetic (AVX512-BF16, AMX),
PyTorch's oneDNN bf16 products run on the hardware; the native kernel (vdpbf16ps) still streams a weight faster
for the few activation rows of decoding, so products of fewer than ``linear_max_rows`` rows go to it.  Without
it (AVX-512 or AVX2 only), PyTorch emulates bf16 products at a fraction of its float32 speed, so few-row products
go to the native kernel (bf16 weights widened in registers, float32 FMAs) and prompt-sized ones widen the weight
to float32 first.  ``QWEN35_CPU_BF16`` picks
the kind: ``auto`` (default) reads /proc/cpuinfo, ``native`` / ``emulated`` force one, so either dispatch path
runs — and is tested — on any machine (forcing ``native`` where the hardware emulates bf16 is slow, not wrong).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ISA_SWITCH, MAX_FUSED_WEIGHTS, NativeKernels, native, requested_isa, runnable_isas

CPU_BF16_SWITCH = "QWEN35_CPU_BF16"
CPU_KINDS = ("native", "emulated")


@dataclass(frozen=True)
class Limits:
    """Where each native op pays off on one CPU kind; 0 turns a native path off."""

    linear_max_rows: int  # bf16-weight products with fewer activation rows run natively (decode, small batches)
    int8_max_rows: int  # int8-weight products with fewer rows run natively; more widen to float32
    widen_min_rows: int | None  # bf16 products with at least this many rows widen the weight (None: never)
    moe_max_tokens: int  # a MoE layer's routed experts in one native call below this many tokens
    norm_max_elements: int  # the zero-centred RMSNorm in one pass up to this many values
    gated_norm_max_elements: int  # the gated RMSNorm (an exp per value) in one pass up to this many values
    deltanet_decode: bool  # the in-place DeltaNet decode step on the slot pool
    decode_attention_min_keys: int  # paged decode attention reads the block table in place from this depth
    # block-FP8 products (qwen35/quant/fp8.py) with fewer rows run on the native kernel, more dequantize the
    # weight band by band to float32 (bf16 on the native kind) for PyTorch's GEMM; same cut-off as int8 (both
    # stream a 1-byte weight and dequantize in registers) until benchmarks/bench_ops.py measures fp8 itself
    fp8_max_rows: int = 48
    # 4-bit products (qwen35/quant/int4.py) with fewer rows run on the native kernel; more dequantize the weight
    # (band by band) for PyTorch's GEMM.  benchmarks/bench_ops.py --only quant (see the int4 entry of RESULTS.md)
    int4_max_rows: int = 48
    # int8 activations: every int4 / int8 weight product, whatever its number of rows, rounds the activations
    # to int8 per block of 32 and sums in integers (NativeKernels.linear_int4_q8 / linear_int8_q8; about 2^-8
    # relative activation error, int4.c and gemm_bf16.c say why).  One rounding for every row count keeps a
    # row's result independent of its batch: a decode step gives the bits of the full forward.  False: the
    # float32 products (few rows native, more dequantize for PyTorch's GEMM), exact to the dequantized weight.
    q8_activations: bool = True
    # the DeltaNet conv + SiLU of a prompt chunk in one pass (q35_causal_conv1d_silu); session 10, 2-core EPYC
    # with AVX512-BF16, 512 tokens of the 0.8B shape: see benchmarks/RESULTS.md
    conv_prefill: bool = True


# Each number points at what set it (benchmarks/RESULTS.md has the runs).
LIMITS: dict[str, Limits] = {
    "emulated": Limits(
        # benchmarks/bench_ops.py (linear).  2-core AVX-512 without bf16, 1 thread (session 2): the native product
        # wins below ~48 rows; widening beats the emulated bf16 GEMM from ~24 rows (1.8x at 64, 3x at 256).
        # 2-core AVX2 EPYC, 2 threads (session 4): native 1.4x faster than widening at 48 rows, even at 128,
        # widening 1.3-1.5x faster at 256; the AVX-512 cut-off is kept for both until it is re-measured there
        linear_max_rows=48, widen_min_rows=32,
        # bench_ops.py (int8): the native int8 product against dequantise + float32 F.linear
        int8_max_rows=48,
        # int8 activations (q8_activations, default on): see the int4 / int8 entries of RESULTS.md, session 9
        # session 3: the grouped experts cut a 16-token decode step of the 35B-A3B shape from 948 to 680 ms
        moe_max_tokens=48,
        # session 3: one token's RMSNorm 16 us native vs 33 PyTorch; the gated norm 74 vs 85 at one token but
        # 554 vs 231 at 16 (a scalar exp per value against PyTorch's vectorised SiLU)
        norm_max_elements=1 << 15, gated_norm_max_elements=1 << 12,
        deltanet_decode=True,
        # benchmarks/bench_ops.py (attention) and bench_depth.py: in place beats gather + SDPA at every depth
        decode_attention_min_keys=1,
    ),
    "native": Limits(
        # 2-core AMD EPYC with AVX512-BF16, no AMX (session 10, benchmarks/bench_ops.py --only linear, 2 threads):
        # the native product with bf16 rows (vdpbf16ps, gemm_bf16.c) against PyTorch's oneDNN bf16 GEMM is 2.5-2.8x
        # faster at 1 row (the 248,320-row lm_head from DRAM: 13.9 against 20.4 ms), 2.1-2.6x at 2, 1.05-1.5x at 4,
        # even to 0.8x at 8, 0.5-0.65x at 16 (oneDNN's packed GEMM reaches ~450 GFLOP/s there, ours ~280).  issue
        # 14's AMX Xeon: PyTorch's bf16 GEMV streamed only 9.5-23 GB/s, its GEMMs 0.7-2.2 TFLOP/s (AMX) — so
        # few-row products are native and the rest stay with PyTorch on this kind
        linear_max_rows=8, widen_min_rows=None,
        # int8 decode is bound by streaming the weights on either kind; PyTorch's int8 kernel streamed no
        # faster than bf16 here (RESULTS.md, session 4)
        int8_max_rows=48,
        # the grouped experts replace ~12 PyTorch calls per chosen expert: dispatch-bound on either kind
        moe_max_tokens=48,
        # session 10 (bench_ops.py --only norm, AVX512-BF16 EPYC, 2 threads, vectorised kernels): RMSNorm 11 vs
        # 15 us at one row of 1,024, 23 vs 20 at 16; the gated norm 16 vs 19 at one token, 20 vs 21 at two, 27 vs
        # 24 at four
        norm_max_elements=1 << 11, gated_norm_max_elements=1 << 12,
        deltanet_decode=True,
        decode_attention_min_keys=1,
    ),
}


def host_has_native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic (or is not x86 on Linux: then PyTorch's own choice is kept)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


@functools.cache
def cpu_kind() -> str:
    """``"native"`` or ``"emulated"``: the bf16 kind the dispatch plans for (``$QWEN35_CPU_BF16``)."""
    mode = os.environ.get(CPU_BF16_SWITCH, "auto").strip().lower() or "auto"
    if mode == "auto":
        return "native" if host_has_native_bf16() else "emulated"
    if mode not in CPU_KINDS:
        raise ValueError(f"{CPU_BF16_SWITCH}={mode!r}: use auto, native (bf16 products in PyTorch, for CPUs with "
                         "AVX512-BF16/AMX) or emulated (bf16 weights widened to float32, for CPUs without)")
    return mode


def check_switches() -> None:
    """Raise ValueError naming a bad ``QWEN35_CPU_BF16`` or ``QWEN35_NATIVE_ISA`` now, before any forward."""
    cpu_kind()
    isa = requested_isa()
    runnable = runnable_isas()
    if runnable and isa not in runnable:
        raise ValueError(f"{ISA_SWITCH}={isa} asks for kernels this CPU cannot run (it runs {', '.join(runnable)})")


def limits() -> Limits:
    return LIMITS[cpu_kind()]


def _native_for(*tensors: torch.Tensor) -> NativeKernels | None:
    """The kernels when they may take these tensors: on the CPU, float32 or bf16, and no gradient to carry."""
    kernels = native()
    if kernels is None:
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) or (grad and t.requires_grad):
            return None
    return kernels


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


# ---- linear products ------------------------------------------------------------------------------------------

def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in x's dtype.  Mixed dtypes (float32 activations on a bf16 model, say) compute in
    the wider of the two, as the native kernel does, instead of failing inside F.linear."""
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        wide = torch.promote_types(x.dtype, weight.dtype)
        return F.linear(x.to(wide), weight.to(wide), None if bias is None else bias.to(wide)).to(x.dtype)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in x's dtype, on the fastest exact-enough path for this CPU kind.

    Every path accumulates in float32, so each is at least as accurate as PyTorch's bf16 GEMM."""
    if weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        lim, rows = limits(), _rows(x)
        if rows < lim.linear_max_rows and weight.is_contiguous():
            kernels = _native_for(x, weight)
            if kernels is not None:
                if bias is None:
                    return kernels.linear_bf16(x, weight, out_dtype=x.dtype)
                y = kernels.linear_bf16(x, weight)
                y += bias
                return y.to(x.dtype)
        if lim.widen_min_rows is not None and rows >= lim.widen_min_rows and x.dtype == torch.bfloat16:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return linear_reference(x, weight, bias)


def linears_reference(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [linear_reference(x, w) for w in weights]


def linears(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ w.T for w in weights]``: where the native product takes them, one call streams every weight once
    (the outputs are column slices of one tensor); otherwise one :func:`linear` each."""
    if 1 < len(weights) <= MAX_FUSED_WEIGHTS and _rows(x) < limits().linear_max_rows \
            and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights):
        kernels = _native_for(x, *weights)
        if kernels is not None:
            y = kernels.linear_bf16_many(x, list(weights), out_dtype=x.dtype)
            return list(y.split([w.shape[0] for w in weights], dim=-1))
    return [linear(x, w) for w in weights]


# ---- int8 activations (the q8_activations products of int4 and int8 weights) ---------------------------------

Q8_BLOCK = 32  # activations per int8 block of the int8-activation int4 product (llama.cpp's Q8_0 block)


def quantize_activations_q8_reference(x: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [M, K] zero-padded to ``padded`` features, each block of 32 rounded to int8 as int4.c's
    q35_linear_int4_q8 does: q = round_half_even(x · (127 / amax)) (float32 arithmetic), d = amax / 127, both 0
    for an all-zero block.  Returns q [M, padded] (integer-valued float32) and d [M, padded / 32] float32."""
    xp = F.pad(x.float(), (0, padded - x.shape[-1])).unflatten(-1, (-1, Q8_BLOCK))
    amax = xp.abs().amax(-1)
    # a true division (``127.0 / amax`` would be PyTorch's reciprocal times 127, one ulp off a quarter of the time)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xp * inv[..., None]).clamp(-127, 127)
    return q.flatten(-2), amax / 127.0


def linear_int8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight · scale).T`` on the dequantised weight, float32 inside, x's dtype out."""
    return F.linear(x.float(), qweight.float() * scale[:, None]).to(x.dtype)


def linear_int8_q8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8-activation int8 product (gemm_bf16.c: q35_linear_int8_q8): per block of 32, the activation scale
    times the exact integer dot of the weight and activation bytes, summed in float64, times the row scale; x's
    dtype out.  Not :func:`linear_int8_reference`: the activations are rounded to int8 first (about 2^-8)."""
    lead, K = x.shape[:-1], qweight.shape[-1]
    padded = -(-K // Q8_BLOCK) * Q8_BLOCK
    q, d = quantize_activations_q8_reference(x.reshape(-1, K), padded)
    wq = F.pad(qweight.double(), (0, padded - K))
    isum = torch.einsum("mbk,nbk->mnb", q.double().unflatten(-1, (-1, Q8_BLOCK)), wq.unflatten(-1, (-1, Q8_BLOCK)))
    y = (isum * d.double()[:, None, :]).sum(-1) * scale.double()[None]
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                scale_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """The product of int8 weight-only quantization (one float32 scale per output row).  With the native
    kernels: every row count through the int8-activation kernel (``q8_activations``), or else few rows through
    the float32 kernel (dequantises in registers, streams the half-size weight once); without them, PyTorch's
    int8 kernel for bf16 activations (``scale_bf16`` given); otherwise the float32 reference."""
    rows = _rows(x)
    scale32 = scale if scale.dtype == torch.float32 else scale.float()  # (a model cast with .to(bf16))
    if x.device.type == "cpu" and (limits().q8_activations or rows < limits().int8_max_rows):
        kernels = _native_for(x)
        if kernels is not None:
            if limits().q8_activations:
                return kernels.linear_int8_q8(x, qweight, scale32)
            return kernels.linear_int8(x, qweight, scale32)
        if rows < limits().int8_max_rows and x.dtype == torch.bfloat16 and scale_bf16 is not None:
            y = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).contiguous(), qweight, scale_bf16)
            return y.reshape(*x.shape[:-1], qweight.shape[0])
    return linear_int8_reference(x, qweight, scale)


def linear_int8_many(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``[linear_int8(x, q, s) for q, s in weights]`` for int8 weights that read the same x: with int8
    activations on the native kernel, one call that rounds x once (each value as the one-weight product gives
    it; the outputs are column slices of one tensor); otherwise one product each."""
    if 1 < len(weights) <= MAX_FUSED_WEIGHTS and limits().q8_activations and x.device.type == "cpu":
        kernels = _native_for(x)
        if kernels is not None:
            pairs = [(q, s if s.dtype == torch.float32 else s.float()) for q, s in weights]
            y = kernels.linear_int8_q8_many(x, pairs)
            return list(y.split([q.shape[0] for q, _ in weights], dim=-1))
    return [linear_int8(x, q, s) for q, s in weights]


# ---- 4-bit weights (group-wise, symmetric) ---------------------------------------------------------------------

INT4_BAND_ELEMENTS = 1 << 24  # the many-row path dequantizes at most this many weights at a time (64 MiB float32)


def dequantize_int4_reference(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition of the 4-bit format (qwen35/quant/int4.py packs it, qwen35/kernels/int4.c says why this
    layout): qweight [..., N, Kp/2] uint8 holds blocks of 64 weights as 32 bytes = eight little-endian 32-bit
    words, bits 4i..4i+3 of word j being weight 8i + j of the block as a two's-complement nibble q (−8..7);
    scales [..., N, Kp/group_size] bf16.  ŵ[n, k] = q · scales[n, k // group_size], exact in float32 (then cast
    to ``dtype``); the padding past ``in_features`` is dropped."""
    lead = qweight.shape[:-1]
    b = qweight.reshape(*lead, -1, 8, 4)  # [..., block, word j, byte p]: byte p holds i = 2p (low), 2p + 1 (high)
    n = torch.stack((b & 15, b >> 4), dim=-1)  # [..., block, j, p, half]
    n = n.movedim(-3, -1).reshape(*lead, -1).to(torch.int16)  # [..., block, i, j] -> weight order
    q = ((n ^ 8) - 8).to(torch.float32)
    w = (q.unflatten(-1, (-1, group_size)) * scales.float()[..., None]).flatten(-2)
    return w[..., :in_features].to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`dequantize_int4_reference` for one [N, Kp/2] weight; one native pass where the kernels load."""
    kernels = native() if qweight.dim() == 2 and qweight.device.type == "cpu" and qweight.is_contiguous() \
        and scales.is_contiguous() and dtype in (torch.float32, torch.bfloat16) else None
    if kernels is not None:
        return kernels.dequantize_int4(qweight, scales, in_features, group_size, dtype)
    return dequantize_int4_reference(qweight, scales, in_features, group_size, dtype)


def linear_int4_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                          group_size: int) -> torch.Tensor:
    """``x @ ŵ.T`` on the dequantized weight, float32 inside, x's dtype out."""
    return F.linear(x.float(), dequantize_int4_reference(qweight, scales, in_features, group_size)).to(x.dtype)


def linear_int4_q8_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                             group_size: int) -> torch.Tensor:
    """The int8-activation 4-bit product (int4.c: q35_linear_int4_q8): per block of 32, weight scale times
    activation scale times the exact integer dot of the 4-bit and 8-bit values, summed in float64; x's dtype out.
    Not :func:`linear_int4_reference`: the activations are rounded to int8 first (about 2^-8 relative)."""
    lead, x2 = x.shape[:-1], x.reshape(-1, in_features)
    padded = qweight.shape[-1] * 2
    q, d = quantize_activations_q8_reference(x2, padded)
    wq = dequantize_int4_reference(qweight, torch.ones_like(scales), padded, group_size)  # the 4-bit values
    isum = torch.einsum("mbk,nbk->mnb", q.double().unflatten(-1, (-1, Q8_BLOCK)),
                        wq.double().unflatten(-1, (-1, Q8_BLOCK)))
    ws = scales.double().repeat_interleave(group_size // Q8_BLOCK, dim=-1)  # [N, blocks]
    y = (isum * d.double()[:, None, :] * ws[None]).sum(-1)
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                group_size: int) -> torch.Tensor:
    """The product of a 4-bit group-wise weight (:func:`dequantize_int4_reference`), x's dtype out.  With the
    native kernels and ``q8_activations`` (the default): every row count with the activations rounded to int8
    first (:func:`linear_int4_q8_reference`; the same bits for a row whatever its batch).  Otherwise few rows
    (decode) through the float32 kernel, which streams the packed weight once and widens it in registers, and
    more rows (prompts) with the weight dequantized band by band for PyTorch's GEMM — float32, or bf16 where the
    CPU multiplies bf16 natively and x is bf16."""
    if x.shape[-1] != in_features:
        raise ValueError(f"linear_int4: activations have {x.shape[-1]} features, the weight takes {in_features}")
    rows = _rows(x)
    if x.device.type == "cpu" and (limits().q8_activations or rows < limits().int4_max_rows):
        kernels = _native_for(x)
        if kernels is not None:
            if limits().q8_activations:
                return kernels.linear_int4_q8(x, qweight, scales, in_features, group_size)
            return kernels.linear_int4(x, qweight, scales, in_features, group_size)
    work = torch.bfloat16 if x.dtype == torch.bfloat16 and cpu_kind() == "native" else torch.float32
    xw = x.to(work)
    N = qweight.shape[0]
    band = max(1, INT4_BAND_ELEMENTS // max(in_features, 1))
    if N <= band:
        return F.linear(xw, dequantize_int4(qweight, scales, in_features, group_size, work)).to(x.dtype)
    y = torch.empty(*x.shape[:-1], N, dtype=work)
    for r0 in range(0, N, band):
        r1 = min(N, r0 + band)
        y[..., r0:r1] = F.linear(xw, dequantize_int4(qweight[r0:r1], scales[r0:r1], in_features, group_size, work))
    return y.to(x.dtype)


def linear_int4_many(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]], in_features: int,
                     group_size: int) -> list[torch.Tensor]:
    """``[linear_int4(x, q, s, in_features, group_size) for q, s in weights]`` for 4-bit weights that read the same
    x: with int8 activations on the native kernel, one call that rounds x once (each output value as the
    one-weight product gives it; the outputs are column slices of one tensor); otherwise one product each."""
    if 1 < len(weights) <= MAX_FUSED_WEIGHTS and limits().q8_activations and x.device.type == "cpu":
        kernels = _native_for(x)
        if kernels is not None:
            y = kernels.linear_int4_q8_many(x, list(weights), in_features, group_size)
            return list(y.split([q.shape[0] for q, _ in weights], dim=-1))
    return [linear_int4(x, q, s, in_features, group_size) for q, s in weights]


# ---- block-FP8 weights ----------------------------------------------------------------------------------------

FP8_BAND_ROWS = 1024  # weight rows dequantized at a time on the many-row path (a multiple of any block height)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [N, K] float8_e4m3fn with one float32 ``scale_inv`` per block of [bn, bk] -> weight · scale_inv in
    float32 (one rounding per value), cast to ``dtype``.  The definition every fp8 path is checked against."""
    bn, bk = block
    N, K = weight.shape
    w = weight.float()
    s = scale_inv.float()
    if N % bn == 0 and K % bk == 0:  # whole blocks: a broadcast, no expanded scale tensor
        return (w.view(N // bn, bn, K // bk, bk) * s[:, None, :, None]).view(N, K).to(dtype)
    s = s.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (w * s).to(dtype)


def linear_fp8_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(weight).T (+ bias)`` in float32, x's dtype out."""
    y = F.linear(x.float(), dequantize_fp8_blocks(weight, scale_inv, block))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _linear_fp8_banded(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
                       ) -> torch.Tensor:
    """The many-row product: the weight dequantized FP8_BAND_ROWS rows at a time (never the whole matrix in
    float32), each band one PyTorch GEMM — float32, or bf16 where the CPU multiplies bf16 natively and x is bf16."""
    bn = block[0]
    N = weight.shape[0]
    in_bf16 = x.dtype == torch.bfloat16 and cpu_kind() == "native"
    work = torch.bfloat16 if in_bf16 else torch.float32
    xw = x.to(work)
    band = max(bn, FP8_BAND_ROWS // bn * bn)
    if N <= band:
        return F.linear(xw, dequantize_fp8_blocks(weight, scale_inv, block, work)).to(x.dtype)
    y = torch.empty(*x.shape[:-1], N, dtype=work)
    for r0 in range(0, N, band):
        r1 = min(N, r0 + band)
        w = dequantize_fp8_blocks(weight[r0:r1], scale_inv[r0 // bn:-(-r1 // bn)], block, work)
        y[..., r0:r1] = F.linear(xw, w)
    return y.to(x.dtype)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product of a block-FP8 weight (float8_e4m3fn [N, K], float32 ``scale_inv`` [ceil(N/bn), ceil(K/bk)],
    w = fp8 · scale_inv), x's dtype out.  Few rows (decode): the native kernel, which dequantizes each block in
    registers and streams the 1-byte weight once; more rows (prompts): the weight dequantized band by band for
    PyTorch's GEMM; without the kernel, the same banded path."""
    rows = _rows(x)
    y = None
    if rows < limits().fp8_max_rows and x.device.type == "cpu" and weight.is_contiguous():
        kernels = _native_for(x)
        if kernels is not None:
            y = kernels.linear_fp8(x, weight, scale_inv if scale_inv.dtype == torch.float32 else scale_inv.float(),
                                   block)
    if y is None:
        y = _linear_fp8_banded(x, weight, scale_inv, block)
    return y if bias is None else y + bias.to(y.dtype)


# ---- norms ----------------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    # F.rms_norm is one fused op (x · rsqrt(mean(x²) + eps)): fewer passes and far less per-call overhead than
    # spelling it out, which matters at one decode token per step
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps) · (offset + weight)`` over the last dim, float32 inside, x's dtype out."""
    kernels = _native_for(x, weight) if x.numel() <= limits().norm_max_elements else None
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps, offset=offset)
    return rms_norm_reference(x, weight, eps, offset)


def gated_rms_norm_reference(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the normalised o is cast to the activation dtype before the weight multiplies it, as the reference model
    # does: in float32 this changes nothing, in bf16 it keeps bit-level agreement
    y = F.rms_norm(o.float(), (o.shape[-1],), eps=eps).to(o.dtype)
    y = weight * y
    return (y * F.silu(z.float())).to(o.dtype)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(weight · norm(o)) · SiLU(z)`` per row of the last dim (the DeltaNet output norm)."""
    kernels = _native_for(o, z, weight) if o.dtype == z.dtype and o.numel() <= limits().gated_norm_max_elements \
        else None
    if kernels is not None:
        return kernels.gated_rms_norm(o, z, weight, eps)
    return gated_rms_norm_reference(o, z, weight, eps)


# ---- mixture of experts ---------------------------------------------------------------------------------------

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up (the dense MLP, the float and the quantized experts share it, so all round alike)."""
    return F.silu(gate) * up


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, n_experts: int,
                    expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [N, H], experts / weights [N, k].  Tokens are grouped by expert so each chosen expert runs once over
    all of its tokens; ``expert(e, tokens)`` computes one expert's SwiGLU.  A token's expert outputs are added
    in increasing expert order."""
    out = torch.zeros_like(x)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    token_of = order // experts.shape[1]
    weight_of = weights.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start:start + n]
        y = expert(e, x[tok]) * weight_of[start:start + n, None]
        out.index_add_(0, tok, y.to(out.dtype))
        start += n
    return out


def moe_experts_reference(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor) -> torch.Tensor:
    def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = linear(xs, gate_up[e]).chunk(2, dim=-1)
        return linear(swiglu(gate, up), down[e])

    return grouped_experts(x, experts, weights, gate_up.shape[0], expert)


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """The routed experts of a sparse-MoE layer: for each token of x [N, H], the sum over its k chosen experts
    (ids ``experts`` [N, k], ``weights`` [N, k]) of weight · down_e(SiLU(gate_e x) · up_e x); gate_up
    [E, 2I, H] (gate rows first), down [E, H, I]."""
    kernels = _native_for(x, gate_up, down) if x.shape[0] < limits().moe_max_tokens \
        and gate_up.dtype == down.dtype == torch.bfloat16 and gate_up.is_contiguous() and down.is_contiguous() \
        else None
    if kernels is not None:  # every chosen expert in one call, with the reference's roundings
        return kernels.moe_experts(x, experts, weights, gate_up, down)
    return moe_experts_reference(x, experts, weights, gate_up, down)


# ---- Gated DeltaNet causal conv -------------------------------------------------------------------------------

def causal_conv1d_silu_reference(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(depthwise causal conv1d) of x [B, T, C] (token-major, as the input projection writes it) with weight
    [C, 1, K] and window [B, C, K-1] (the K-1 inputs before x; None = zeros).  Returns the activations [B, T, C]
    and the new window (the last K-1 inputs, history included), both in x's dtype."""
    x = x.transpose(1, 2)  # [B, C, T]
    K = weight.shape[-1]
    if window is None:
        window = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    full = torch.cat([window.to(x.dtype), x], dim=-1)
    if x.shape[-1] == 1:  # decode: one dot product per channel beats conv1d's setup cost
        y = (full * weight[:, 0, :]).sum(-1, keepdim=True)
    else:
        # K shifted multiply-adds in float32 rather than F.conv1d(groups=C): PyTorch's grouped bf16 conv1d takes
        # 0.4-0.9 s for a [6144, 512] prompt chunk on AVX2 CPUs (20-190x the float32 sum), and the bf16 result
        # of the float32 sum rounds to the same values (checked bit for bit at 64-2,048 tokens)
        T = x.shape[-1]
        wide = full.float()
        w = weight[:, 0, :].float()
        y = wide[..., :T] * w[:, :1]
        for k in range(1, K):
            y.addcmul_(wide[..., k:k + T], w[:, k:k + 1])
        y = y.to(x.dtype)
    return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - (K - 1):]


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv1d_silu_reference`, natively for a prompt chunk (one pass over x instead of six, see
    q35_causal_conv1d_silu); decode steps go through :func:`deltanet_decode_`."""
    if limits().conv_prefill and x.shape[1] > 1 and x.dtype == weight.dtype:
        kernels = _native_for(x, weight, *([] if window is None else [window]))
        if kernels is not None:
            return kernels.causal_conv1d_silu(x, weight, None if window is None else window.to(x.dtype))
    return causal_conv1d_silu_reference(x, weight, window)


# ---- Gated DeltaNet decode step -------------------------------------------------------------------------------

def deltanet_decode_reference_(qkv: torch.Tensor, conv_weight: torch.Tensor, windows: torch.Tensor,
                               states: torch.Tensor, slots: torch.Tensor, n_k: int, g: torch.Tensor,
                               beta: torch.Tensor) -> torch.Tensor:
    # the model's own recurrent rule (imported here: the model imports this module)
    from qwen35.model.gated_delta_rule import gated_delta_rule_recurrent  # noqa: PLC0415

    n = qkv.shape[0]
    _, Hv, dk, dv = states.shape
    act, window = causal_conv1d_silu_reference(qkv[:, None], conv_weight, windows.index_select(0, slots))
    q, k, v = act[:, 0].split([n_k * dk, n_k * dk, Hv * dv], dim=-1)
    o, state = gated_delta_rule_recurrent(q.reshape(n, 1, n_k, dk), k.reshape(n, 1, n_k, dk),
                                          v.reshape(n, 1, Hv, dv), g[:, None], beta[:, None],
                                          states.index_select(0, slots))
    windows.index_copy_(0, slots, window.to(windows.dtype))
    states.index_copy_(0, slots, state.to(states.dtype))
    return o[:, 0]


def deltanet_decode_(qkv: torch.Tensor, conv_weight: torch.Tensor, windows: torch.Tensor, states: torch.Tensor,
                     slots: torch.Tensor, n_k: int, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One decode token for n sequences whose conv windows and recurrent states are rows ``slots`` of the pools
    ``windows`` [P, C, K-1] and ``states`` [P, Hv, dk, dv], updated in place: causal conv + SiLU, q/k L2 norms,
    the gated delta step.  qkv [n, C], g / beta [n, Hv] -> o [n, Hv, dv] in qkv's dtype."""
    kernels = _native_for(qkv, conv_weight, windows) if limits().deltanet_decode \
        and states.device.type == "cpu" and states.dtype == torch.float32 and states.is_contiguous() \
        and not torch.is_grad_enabled() and qkv.dtype == windows.dtype == conv_weight.dtype else None
    if kernels is not None:  # conv, norms and step in one call, in place on the pools
        return kernels.deltanet_decode_(qkv, conv_weight, windows, states, slots, n_k, g, beta).to(qkv.dtype)
    return deltanet_decode_reference_(qkv, conv_weight, windows, states, slots, n_k, g, beta)


# ---- decode attention over the paged KV cache -----------------------------------------------------------------

def _history_rows(tables: torch.Tensor, lengths: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool rows [n, L] of every sequence's history (padded to the longest) and which of them are real."""
    pos = torch.arange(int(lengths.max()), device=tables.device)
    rows = tables[:, pos // block_size] * block_size + pos % block_size  # [n, L]
    valid = pos[None] < lengths[:, None]
    # padding repeats the sequence's own first row: masked out, but never uninitialised memory (a NaN there
    # would survive a zero attention weight)
    return torch.where(valid, rows, rows[:, :1]), valid


def paged_decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float
                                     ) -> torch.Tensor:
    """Gather each sequence's history into one zero-padded batch and run SDPA over it."""
    rows, valid = _history_rows(tables, lengths, block_size)
    ks, vs = keys[rows].transpose(1, 2), values[rows].transpose(1, 2)  # [n, Hkv, L, d]
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, scale=scale,
                                       enable_gqa=ks.shape[1] != q.shape[1])
    return o[:, :, 0]


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, block_size: int, scale: float,
                           key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """One decode query per sequence (q [n, H, d]) over its history in the paged pools (keys / values
    [num_blocks · block_size, Hkv, d]; block ids ``tables`` [n, max_blocks], ``lengths`` [n] keys each) ->
    o [n, H, d].  The native kernel reads the blocks where they lie; the reference gathers them.

    With ``key_scales`` / ``value_scales`` ([num_blocks · block_size, Hkv] float32) the pools are a quantized KV
    cache (int8 or float8_e4m3fn, see :func:`quantize_kv`): the kernel dequantizes each row in registers as it
    reads it, the reference gathers and dequantizes the history, then attends in float32."""
    if key_scales is not None or value_scales is not None:
        return _paged_decode_attention_quant(q, keys, values, key_scales, value_scales, tables, lengths,
                                             block_size, scale)
    kernels = _native_for(q, keys, values) if q.shape[0] and int(lengths.min()) >= \
        limits().decode_attention_min_keys > 0 and not torch.is_grad_enabled() else None
    if kernels is not None:
        return kernels.paged_decode_attention(q, keys, values, tables, lengths, block_size, scale)
    return paged_decode_attention_reference(q, keys, values, tables, lengths, block_size, scale)


# ---- the quantized KV cache -----------------------------------------------------------------------------------

# Largest magnitude of each KV storage format: a row's largest |value| is scaled onto it
KV_QUANT_MAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of KV rows: x [..., d] -> (q [..., d] in ``dtype``, scale [...] float32), one scale
    per row of d (per token per KV head), ``scale = max|row| / KV_QUANT_MAX[dtype]``, x ≈ q · scale.

    int8 rounds to nearest (|error| <= scale / 2 = max|row| / 254); float8_e4m3fn rounds to nearest even with
    3 mantissa bits (relative error <= 2^-4, absolute <= 2^-10 · scale below e4m3's smallest normal).  An
    all-zero row gets scale 0 and dequantizes to exact zeros."""
    if dtype not in KV_QUANT_MAX:
        raise ValueError(f"quantize_kv stores int8 or float8_e4m3fn, not {dtype}")
    xf = x.float()
    qmax = KV_QUANT_MAX[dtype]
    scale = xf.abs().amax(dim=-1) / qmax
    y = xf / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    if dtype == torch.int8:
        return y.round_().clamp_(-qmax, qmax).to(torch.int8), scale
    return y.clamp_(-qmax, qmax).to(dtype), scale


def kv_write_quant_reference(pool: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [n, Hkv, d] quantized (:func:`quantize_kv`) at pool ``rows`` [n], its scales beside it."""
    q, s = quantize_kv(x, pool.dtype)
    if pool.dtype == torch.float8_e4m3fn:  # (PyTorch has no index_copy_ for float8)
        pool.view(torch.uint8).index_copy_(0, rows, q.view(torch.uint8))
    else:
        pool.index_copy_(0, rows, q)
    scales.index_copy_(0, rows, s)


def kv_write_quant(pool: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """:func:`kv_write_quant_reference` in one native pass where the kernels load (the same bytes)."""
    kernels = _native_for(x) if pool.device.type == "cpu" and pool.is_contiguous() and scales.is_contiguous() \
        else None
    if kernels is not None:
        kernels.kv_write_quant(pool, scales, rows, x)
        return
    kv_write_quant_reference(pool, scales, rows, x)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale (q [..., d] int8 or float8_e4m3fn, scale [...]) in float32, then cast to ``dtype``."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def paged_decode_attention_quant_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                           key_scales: torch.Tensor, value_scales: torch.Tensor,
                                           tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                                           scale: float) -> torch.Tensor:
    """Decode attention over a quantized paged cache: gather each history, dequantize it to float32 and run the
    float reference on it (q widened to float32, the output in q's dtype)."""
    rows, _ = _history_rows(tables, lengths, block_size)
    picked = rows.reshape(-1)
    n, L = rows.shape
    ks = dequantize_kv(keys[picked], key_scales[picked]).view(n * L, *keys.shape[1:])
    vs = dequantize_kv(values[picked], value_scales[picked]).view(n * L, *values.shape[1:])
    # the gathered history is a pool of its own: sequence i's is its one block (of L rows), block i
    own = torch.arange(n, device=q.device)[:, None]
    return paged_decode_attention_reference(q.float(), ks, vs, own, lengths, L, scale).to(q.dtype)


def _paged_decode_attention_quant(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                  key_scales: torch.Tensor | None, value_scales: torch.Tensor | None,
                                  tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float
                                  ) -> torch.Tensor:
    if key_scales is None or value_scales is None or keys.dtype not in KV_QUANT_MAX or values.dtype != keys.dtype:
        raise ValueError("a quantized KV cache needs int8 or float8_e4m3fn keys and values of one dtype and both "
                         f"key_scales and value_scales; got {keys.dtype} / {values.dtype} pools")
    kernels = native() if q.shape[0] and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) \
        and int(lengths.min()) >= limits().decode_attention_min_keys > 0 and not torch.is_grad_enabled() else None
    if kernels is not None:
        return kernels.paged_decode_attention_quant(q, keys, values, key_scales, value_scales, tables, lengths,
                                                    block_size, scale)
    return paged_decode_attention_quant_reference(q, keys, values, key_scales, value_scales, tables, lengths,
                                                  block_size, scale)


__all__ = ["CPU_BF16_SWITCH", "CPU_KINDS", "KV_QUANT_MAX", "LIMITS", "Limits", "check_switches", "cpu_kind",
           "deltanet_decode_", "deltanet_decode_reference_", "dequantize_fp8_blocks", "dequantize_int4",
           "dequantize_int4_reference", "dequantize_kv", "gated_rms_norm", "gated_rms_norm_reference",
           "grouped_experts", "host_has_native_bf16", "limits", "linear", "linear_fp8", "linear_fp8_reference",
           "kv_write_quant", "kv_write_quant_reference", "linear_int4", "linear_int4_many",
           "linear_int4_q8_reference", "linear_int4_reference", "linear_int8", "linear_int8_many",
           "linear_int8_q8_reference",
           "linear_int8_reference", "linear_reference", "linears", "linears_reference", "moe_experts",
           "moe_experts_reference", "paged_decode_attention", "paged_decode_attention_quant_reference",
           "paged_decode_attention_reference", "quantize_activations_q8_reference", "quantize_kv", "rms_norm",
           "rms_norm_reference", "swiglu"]
