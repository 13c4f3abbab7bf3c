"""Weight-only 4-bit quantization: groups of ``group_size`` consecutive inputs (along K) share one bf16 scale.

Why: decoding reads every weight once per token, so its speed is the speed at which the weights stream; 4-bit
weights are a quarter of bf16's bytes (half of int8's).  The products go through
``qwen35.kernels.ops.linear_int4``: with the native kernels, every row count with the activations rounded to
int8 per block of 32 and integer dot products on the packed weight (qwen35/kernels/int4.c; each row rounded
alone, so decode steps and prompts give a row the same bits); without them, or with ``q8_activations`` off, few
rows on a float32 kernel and prompt chunks as GEMMs on the weight dequantized on the fly.

Format (the definition is ``qwen35.kernels.ops.dequantize_int4_reference``): a weight [N, K] becomes
``qweight`` uint8 [N, Kp/2] and ``scales`` bf16 [N, Kp/G], Kp = K rounded up to a multiple of max(G, 64)
(padding weights are 0).  Each block of 64 weights is eight 32-bit words whose nibble i of word j is weight
8i + j, a two's-complement value q in −8..7 (the layout qwen35/kernels/int4.c unpacks with two shifts and no
shuffles); ŵ = q · scale — symmetric, 16 levels.

Why symmetric and why these choices (measured on every quantized weight of the embedded model, relative squared
error Σ(w − ŵ)² / Σw², and on Gaussian weights, which gave the same ranking):

  bits/weight  format                          rel. error   with the clip search below
  4.5          symmetric, group 32, bf16 scale  7.30e-3     6.79e-3
  4.5          affine (scale + min), group 64   7.95e-3     7.34e-3
  4.25         symmetric, group 64              8.88e-3     8.13e-3
  4.25         affine, group 128                9.83e-3     8.81e-3

At the same bits per weight the symmetric format with twice as many groups beats the affine one (the weights are
near-symmetric around 0, so a zero point buys less than halving the group does), and its product needs no
per-group activation sums.  Scales in bf16, fp16 or fp32 gave the same error to three digits (6.070e-3,
6.068e-3, 6.068e-3 at group 32): bf16 costs half of fp32, has fp32's range (fp16 loses tiny scales to
subnormals) and widens with a shift.  The group's scale maps the weight of largest magnitude onto −8 (as
llama.cpp's Q4_0 does, so all 16 levels are used), shrunk by the factor of :data:`CLIP_CANDIDATES` that gives
the group the least squared error (clipping the extreme weight a little rounds the rest more finely).

Error bound (tested): every weight satisfies |w − ŵ| ≤ max(|s|/2, distance from w to the range s·[−8, 7]) for
its group's stored scale s, and each group's squared error is at most that of plain round-to-nearest with the
unshrunk scale.

Kept in the model's dtype, as int8 keeps them (:data:`qwen35.quant.int8.KEEP`): the DeltaNet ``in_proj_a`` /
``in_proj_b``, the router ``mlp.gate``, ``shared_expert_gate``, ``mtp.fc``, the vision tower, norms, ``A_log``,
``dt_bias``, convolutions and the embeddings.  The lm_head: see :func:`quantize_int4`.

Default group size 32, from benchmarks/quant_quality.py on the embedded model (64 held-out chats, 3,327
assistant tokens, float32 activations; KL to bf16 / top-1 agreement): group 32 0.0016 / 99.4%, 64 0.0027 /
99.1%, 128 0.0024 / 99.2% (int8: 0.00003 / 99.9%).  Group 32 costs 4% more bytes than 64 (4.5 against 4.25 bits
per weight, llama.cpp Q4_K's granularity too) and its one-row product ran ~10% slower (4096 x 2048, 1 thread,
other core busy: 701 against 636 us; int8 868, bf16 1307).  lm_head int8 measured the same KL as a bf16 head
(0.0027 both at group 64) and int4 worse (0.0034), so the head is int8 by default: the same quality as keeping
it, half its bytes per decoded token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ops import dequantize_int4_reference, grouped_experts, linear_int4, linear_int4_many
from .int8 import KEEP, Int8Linear, _swiglu, replace_modules

BLOCK = 64  # weights per 32-byte block (eight words of eight nibbles)
DEFAULT_GROUP_SIZE = 32  # see the module docstring: lowest KL, +4% bytes, ~10% slower one-row product than 64
# shrink factors of the group's largest-magnitude weight tried for its scale (1.0 = round to nearest)
CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8)
HEAD_FORMATS = ("int4", "int8", None)  # how quantize_int4 may store the lm_head (None: the model's dtype)
# weights quantized at a time (whole rows): bounds the float32 working set, ~2 MiB per temporary, so quantizing a
# checkpoint while loading it adds little to its peak; smaller chunks also stay in cache (a 4096 x 2048 bf16 weight,
# 1 thread, other core busy: 573 ms at 4M weights per chunk, 340 at 1M, 256 at 512K)
_CHUNK_ELEMENTS = 1 << 19


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 32 \
            or group_size & (group_size - 1):
        raise ValueError(f"int4 group size must be a power of two >= 32 (32, 64, 128, ...), got {group_size!r}")
    return group_size


def padded_features(in_features: int, group_size: int) -> int:
    """K rounded up to whole 64-weight blocks and whole groups: the stored row length in weights."""
    span = max(group_size, BLOCK)
    return -(-in_features // span) * span


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., Kp] integer values −8..7 (Kp a multiple of 64) -> [..., Kp/2] uint8 in the kernel's block layout."""
    if q.shape[-1] % BLOCK:
        raise ValueError(f"pack_nibbles needs rows of whole {BLOCK}-value blocks, got {q.shape[-1]} values")
    n = (q.to(torch.int16) & 15).to(torch.uint8).reshape(*q.shape[:-1], -1, 4, 2, 8)  # [..., block, p, half, j]
    byte = n[..., 0, :] | (n[..., 1, :] << 4)  # [..., block, p, j]: word j's byte p holds i = 2p and 2p + 1
    return byte.transpose(-1, -2).reshape(*q.shape[:-1], -1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: [..., Kp/2] uint8 -> [..., Kp] int8 values −8..7."""
    b = packed.reshape(*packed.shape[:-1], -1, 8, 4)
    n = torch.stack((b & 15, b >> 4), dim=-1).movedim(-3, -1).reshape(*packed.shape[:-1], -1)
    return ((n.to(torch.int16) ^ 8) - 8).to(torch.int8)


def _quantize_chunk(g: torch.Tensor, candidates: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """g [R, groups, G] float32 -> (q [R, groups, G] int values −8..7 as float32, scale [R, groups] bf16)."""
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]  # the signed weight of largest magnitude
    best_err = best_q = best_s = None
    for c in candidates:
        s = (peak * (c / -8.0)).to(torch.bfloat16)
        sf = s.float()
        safe = torch.where(sf == 0, torch.ones_like(sf), sf)[..., None]
        q = torch.round(g / safe).clamp_(-8, 7)
        q = torch.where(sf[..., None] == 0, torch.zeros_like(q), q)  # an all-zero group
        err = (q * sf[..., None] - g).square_().sum(-1)
        if best_err is None:
            best_err, best_q, best_s = err, q, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[..., None], q, best_q)
            best_s = torch.where(better, s, best_s)
    return best_q, best_s


def quantize_groups(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                    candidates: tuple[float, ...] = CLIP_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (qweight uint8 [..., N, Kp/2], scales bf16 [..., N, Kp/group_size]).

    ``candidates`` are the scale shrink factors searched per group; ``(1.0,)`` is plain round-to-nearest."""
    check_group_size(group_size)
    if w.dim() < 2 or w.shape[-1] == 0 or not w.is_floating_point():
        raise ValueError(f"int4 quantizes float weights [..., N, K] with K >= 1, got {w.dtype} {tuple(w.shape)}")
    if not candidates or any(not 0.0 < c <= 1.0 for c in candidates):
        raise ValueError(f"clip candidates must be factors in (0, 1], got {candidates!r}")
    lead, K = w.shape[:-1], w.shape[-1]
    Kp = padded_features(K, group_size)
    rows = w.detach().reshape(-1, K)
    R = rows.shape[0]
    qweight = torch.empty(R, Kp // 2, dtype=torch.uint8)
    scales = torch.empty(R, Kp // group_size, dtype=torch.bfloat16)
    step = max(1, _CHUNK_ELEMENTS // Kp)
    for r0 in range(0, R, step):
        chunk = rows[r0:r0 + step].float()
        if Kp != K:
            chunk = torch.nn.functional.pad(chunk, (0, Kp - K))
        q, s = _quantize_chunk(chunk.view(chunk.shape[0], Kp // group_size, group_size), tuple(candidates))
        qweight[r0:r0 + step] = pack_nibbles(q.reshape(chunk.shape[0], Kp).to(torch.int8))
        scales[r0:r0 + step] = s
    return qweight.reshape(*lead, Kp // 2), scales.reshape(*lead, Kp // group_size)


def dequantize_groups(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ [..., N, in_features] of a packed weight (see the module docstring)."""
    return dequantize_int4_reference(qweight, scales, in_features, group_size, dtype)


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int, what: str
                  ) -> None:
    """ValueError naming ``what`` unless (qweight, scales) encode an [N, in_features] weight in groups of
    ``group_size``: uint8 [N, Kp/2] and bf16 [N, Kp/group_size]."""
    kp = padded_features(in_features, group_size) if in_features > 0 else 0
    if kp == 0 or qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != kp // 2:
        raise ValueError(f"{what}: a 4-bit weight of {in_features} inputs must be uint8 [rows, {kp // 2}], got "
                         f"{qweight.dtype} {list(qweight.shape)}")
    if scales.dtype != torch.bfloat16 or tuple(scales.shape) != (qweight.shape[0], kp // group_size):
        raise ValueError(f"{what}: its scales must be bfloat16 [{qweight.shape[0]}, {kp // group_size}] (one per "
                         f"group of {group_size} inputs), got {scales.dtype} {list(scales.shape)}")


class Int4Linear(nn.Module):
    """Drop-in for a linear layer with 4-bit group-wise weights (bias, if any, kept in its dtype)."""

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        self.group_size = check_group_size(group_size)
        q, s = quantize_groups(linear.weight.detach(), group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @classmethod
    def packed(cls, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
               group_size: int = DEFAULT_GROUP_SIZE, bias: torch.Tensor | None = None) -> Int4Linear:
        """The layer around already-packed tensors (a quantized checkpoint), without re-quantizing a float weight;
        it holds the tensors given (copy them first if they are views of a file)."""
        check_group_size(group_size)
        check_packed(qweight, scales, in_features, group_size, "Int4Linear.packed")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.group_size = group_size
        m.register_buffer("qweight", qweight)
        m.register_buffer("scales", scales)
        m.bias = bias
        m.in_features, m.out_features = in_features, qweight.shape[0]
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    def dequantized(self) -> torch.Tensor:
        return dequantize_groups(self.qweight, self.scales, self.in_features, self.group_size)

    def _scales(self) -> torch.Tensor:
        # a model cast with .float() carries float32 copies of the bf16 scales: the same values
        return self.scales if self.scales.dtype == torch.bfloat16 else self.scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_int4(x, self.qweight, self._scales(), self.in_features, self.group_size)
        return y if self.bias is None else y + self.bias

    @staticmethod
    def project_many(x: torch.Tensor, layers: list[Int4Linear]) -> list[torch.Tensor]:
        """``[layer(x) for layer in layers]`` (qwen35.model.linear.project): layers of one input size and group
        size without biases share one native call; others are called one by one."""
        first = layers[0]
        if any(m.bias is not None or m.in_features != first.in_features or m.group_size != first.group_size
               for m in layers):
            return [m(x) for m in layers]
        return linear_int4_many(x, [(m.qweight, m._scales()) for m in layers], first.in_features, first.group_size)


class Int4Experts(nn.Module):
    """Drop-in for ``qwen35.model.moe.Experts`` with 4-bit expert weights: gate_up [E, 2I, H] and down [E, H, I]
    packed per expert row; each chosen expert runs once over all of its tokens (``grouped_experts``)."""

    def __init__(self, experts, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        self.group_size = check_group_size(group_size)
        self.n_experts, self.intermediate = experts.n_experts, experts.intermediate
        self.in_features = {}
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            q, s = quantize_groups(w, group_size)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scales", s)
            self.in_features[name] = w.shape[-1]

    @classmethod
    def empty(cls, n_experts: int, hidden: int, intermediate: int, group_size: int = DEFAULT_GROUP_SIZE
              ) -> Int4Experts:
        """A bank with uninitialised storage (no page touched until written), for a loader to fill expert by
        expert: gate_up [E, 2I, H] (gate rows first) and down [E, H, I] in the packed layout."""
        check_group_size(group_size)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.group_size, m.n_experts, m.intermediate = group_size, n_experts, intermediate
        m.in_features = {"gate_up_proj": hidden, "down_proj": intermediate}
        for name, rows in (("gate_up_proj", 2 * intermediate), ("down_proj", hidden)):
            kp = padded_features(m.in_features[name], group_size)
            m.register_buffer(f"{name}_q", torch.empty(n_experts, rows, kp // 2, dtype=torch.uint8))
            m.register_buffer(f"{name}_scales", torch.empty(n_experts, rows, kp // group_size, dtype=torch.bfloat16))
        return m

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, intermediate={self.intermediate}, group_size={self.group_size}"

    def dequantized(self, name: str) -> torch.Tensor:
        """All experts' ŵ of ``gate_up_proj`` or ``down_proj`` in float32."""
        return dequantize_groups(getattr(self, f"{name}_q"), getattr(self, f"{name}_scales"),
                                 self.in_features[name], self.group_size)

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        scales = getattr(self, f"{name}_scales")[e]
        if scales.dtype != torch.bfloat16:
            scales = scales.to(torch.bfloat16)
        return linear_int4(x, getattr(self, f"{name}_q")[e], scales, self.in_features[name], self.group_size)

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        return grouped_experts(x, routing.experts, routing.weights, self.n_experts,
                               lambda e, xs: self.project("down_proj", e, _swiglu(self.project("gate_up_proj", e, xs))))


def quantize_int4(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, *, lm_head: str | None = "int8"
                  ) -> nn.Module:
    """Replace the model's large linear layers and expert banks by 4-bit versions, in place.

    ``lm_head``: "int4", "int8" or None (kept in the model's dtype; a tied head then stays shared with the
    embedding).  The default (int8) is what benchmarks/quant_quality.py measured (module docstring)."""
    from ..model.moe import Experts

    check_group_size(group_size)
    if lm_head not in HEAD_FORMATS:
        raise ValueError(f"lm_head must be one of {', '.join(map(repr, HEAD_FORMATS))}, got {lm_head!r}")
    def convert(full: str, child: nn.Module):
        if full.startswith("visual"):  # the tower stays in the model's dtype (memory.py counts it so)
            return None
        if isinstance(child, nn.Linear) and not full.endswith(KEEP):
            if full != "lm_head":
                return lambda lin: Int4Linear(lin, group_size)
            if lm_head is None:
                return None
            return Int8Linear if lm_head == "int8" else (lambda lin: Int4Linear(lin, group_size))
        return (lambda ex: Int4Experts(ex, group_size)) if isinstance(child, Experts) else None

    # a kept (lm_head=None) tied head stays shared with the embedding: nothing to freeze
    return replace_modules(model, convert, "int4", freeze_tied_embedding=lm_head is not None)


__all__ = ["BLOCK", "CLIP_CANDIDATES", "DEFAULT_GROUP_SIZE", "HEAD_FORMATS", "Int4Experts", "Int4Linear",
           "check_group_size", "check_packed", "dequantize_groups", "pack_nibbles", "padded_features",
           "quantize_groups", "quantize_int4", "unpack_nibbles"]
