"""The model's operations that have a native twin, and the one place that decides which of the two runs.

Each op here is three things behind one signature:

* a PyTorch **reference** (``*_reference``): the definition of the op, used wherever the native kernel does not
  apply, and the oracle of the tests;
* **eligibility**: whether the native kernel may take these tensors (CPU, float32 / bf16, no gradient to carry
  — the kernels have no backward — and the size limits of this CPU kind in :data:`LIMITS`);
* the **native call** (:class:`qwen35.kernels.NativeKernels`).

The model files call these ops and read as math; nothing outside this module looks at the CPU kind.

CPU kind.  x86 CPUs come in two kinds as far as bf16 goes.  With native bf16 arithmetic (AVX512-BF16, AMX),
PyTorch's oneDNN bf16 products run on the hardware.  Without it (AVX-512 or AVX2 only), PyTorch emulates bf16
products at a fraction of its float32 speed, so few-row products go to the native kernel (bf16 weights widened
in registers, float32 FMAs) and prompt-sized ones widen the weight to float32 first.  ``QWEN35_CPU_BF16`` picks
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
        # issue 14's run on an AVX512-BF16/AMX Xeon: PyTorch's bf16 GEMV there streams 9.5-23 GB/s and its
        # GEMMs reach 0.7-2.2 TFLOP/s (AMX), so products stay with PyTorch on this kind
        linear_max_rows=0, widen_min_rows=None,
        # int8 decode is bound by streaming the weights on either kind; PyTorch's int8 kernel streamed no
        # faster than bf16 here (RESULTS.md, session 4)
        int8_max_rows=48,
        # the grouped experts replace ~12 PyTorch calls per chosen expert: dispatch-bound on either kind
        moe_max_tokens=48,
        norm_max_elements=1 << 15, gated_norm_max_elements=1 << 12,
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


def linear_int8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight · scale).T`` on the dequantised weight, float32 inside, x's dtype out."""
    return F.linear(x.float(), qweight.float() * scale[:, None]).to(x.dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                scale_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """The product of int8 weight-only quantization (one float32 scale per output row).  Few rows: the native
    kernel (dequantises in registers, streams the half-size weight once); without it, PyTorch's int8 kernel for
    bf16 activations (``scale_bf16`` given); otherwise the float32 reference."""
    rows = _rows(x)
    if rows < limits().int8_max_rows and x.device.type == "cpu":
        kernels = _native_for(x)
        if kernels is not None:  # (a model cast with .to(bf16) carries bf16 scales: the kernel reads float32)
            return kernels.linear_int8(x, qweight, scale if scale.dtype == torch.float32 else scale.float())
        if x.dtype == torch.bfloat16 and scale_bf16 is not None:
            y = torch._weight_int8pack_mm(x.reshape(rows, x.shape[-1]).contiguous(), qweight, scale_bf16)
            return y.reshape(*x.shape[:-1], qweight.shape[0])
    return linear_int8_reference(x, qweight, scale)


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


# ---- Gated DeltaNet decode step -------------------------------------------------------------------------------

def deltanet_decode_reference_(qkv: torch.Tensor, conv_weight: torch.Tensor, windows: torch.Tensor,
                               states: torch.Tensor, slots: torch.Tensor, n_k: int, g: torch.Tensor,
                               beta: torch.Tensor) -> torch.Tensor:
    # the model's own conv and recurrent rule (imported here: the model imports this module)
    from qwen35.model.deltanet import causal_conv1d  # noqa: PLC0415
    from qwen35.model.gated_delta_rule import gated_delta_rule_recurrent  # noqa: PLC0415

    n = qkv.shape[0]
    _, Hv, dk, dv = states.shape
    act, window = causal_conv1d(qkv[:, :, None], conv_weight, windows.index_select(0, slots))
    q, k, v = act[:, :, 0].split([n_k * dk, n_k * dk, Hv * dv], dim=-1)
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

def paged_decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float
                                     ) -> torch.Tensor:
    """Gather each sequence's history into one zero-padded batch and run SDPA over it."""
    longest = int(lengths.max())
    pos = torch.arange(longest, device=q.device)
    rows = tables[:, pos // block_size] * block_size + pos % block_size  # [n, L]
    valid = pos[None] < lengths[:, None]
    # padding repeats the sequence's own first row: masked out, but never uninitialised memory (a NaN there
    # would survive a zero attention weight)
    rows = torch.where(valid, rows, rows[:, :1])
    ks, vs = keys[rows].transpose(1, 2), values[rows].transpose(1, 2)  # [n, Hkv, L, d]
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, scale=scale,
                                       enable_gqa=ks.shape[1] != q.shape[1])
    return o[:, :, 0]


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """One decode query per sequence (q [n, H, d]) over its history in the paged pools (keys / values
    [num_blocks · block_size, Hkv, d]; block ids ``tables`` [n, max_blocks], ``lengths`` [n] keys each) ->
    o [n, H, d].  The native kernel reads the blocks where they lie; the reference gathers them."""
    kernels = _native_for(q, keys, values) if q.shape[0] and int(lengths.min()) >= \
        limits().decode_attention_min_keys > 0 and not torch.is_grad_enabled() else None
    if kernels is not None:
        return kernels.paged_decode_attention(q, keys, values, tables, lengths, block_size, scale)
    return paged_decode_attention_reference(q, keys, values, tables, lengths, block_size, scale)


__all__ = ["CPU_BF16_SWITCH", "CPU_KINDS", "LIMITS", "Limits", "check_switches", "cpu_kind", "deltanet_decode_",
           "deltanet_decode_reference_", "gated_rms_norm", "gated_rms_norm_reference", "grouped_experts",
           "host_has_native_bf16", "limits", "linear", "linear_int8", "linear_int8_reference", "linear_reference",
           "linears", "linears_reference", "moe_experts", "moe_experts_reference", "paged_decode_attention",
           "paged_decode_attention_reference", "rms_norm", "rms_norm_reference", "swiglu"]
