"""Block-FP8 weights kept as FP8: the layout of the official Qwen/Qwen3.5-*-FP8 checkpoints.

Layout (DeepSeek-V3-style fine-grained FP8, qwen35-facts §2): a Linear weight [N, K] is stored as
``weight`` float8_e4m3fn [N, K] plus ``weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)], one scale per
128×128 block, and the real weight is ``fp8 · scale_inv`` (the name says "inverse" because the quantizer divided by
it).  Quantizing a block maps its largest magnitude onto e4m3's largest finite value, 448.

Why keep it: widening an FP8 checkpoint to bf16 at load doubles its memory, and a decode step reads every weight
once, so 1-byte weights also halve what decoding streams.  The products go through
``qwen35.kernels.ops.linear_fp8``: few rows on the native kernel (blocks dequantized in registers), prompt-sized
products on the weight dequantized band by band for PyTorch's GEMM.

Which modules: every Linear of the decoder and the MTP block, and the routed experts, except what the official
release keeps in high precision (:data:`KEEP`): the DeltaNet ``in_proj_a`` / ``in_proj_b``, the MoE router
(``mlp.gate``, not a Linear here), ``shared_expert_gate``, ``mtp.fc``, ``lm_head`` and the embeddings; the vision
tower, norms, conv1d, A_log and dt_bias are never converted.

Error: e4m3 has 3 mantissa bits, so |w − ŵ| <= 2^-4 |w| for values at least 2^-6 · scale (e4m3's smallest
normal), and <= 2^-10 · scale_inv below; per block the scale follows that block's own largest weight.

The modules keep their storage dtypes when the model is cast (``model.to(torch.bfloat16)`` moves devices, never
turns the FP8 bytes into bf16 or rounds the float32 scales).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ops import dequantize_fp8_blocks, grouped_experts, linear_fp8, swiglu
from .int8 import replace_modules

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK: tuple[int, int] = (128, 128)  # weight_block_size of the official checkpoints
# kept in high precision, as in the official FP8 release (qwen35-facts §2; the router is not an nn.Linear)
KEEP = ("linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.gate", "shared_expert_gate", "mtp.fc", "lm_head")


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (float8_e4m3fn [..., N, K], float32 scale_inv [..., ceil(N/bn), ceil(K/bk)]).

    scale_inv = max|block| / 448, the fp8 value = w / scale_inv rounded to nearest even (clamped to ±448 so a
    quotient rounded just above 448 cannot become NaN); an all-zero block gets a tiny scale and zeros."""
    bn, bk = block
    wf = w.float()
    N, K = wf.shape[-2:]
    pn, pk = (-N) % bn, (-K) % bk
    if pn or pk:
        wf = torch.nn.functional.pad(wf, (0, pk, 0, pn))
    tiles = wf.unflatten(-2, (-1, bn)).unflatten(-1, (-1, bk))  # [..., N/bn, bn, K/bk, bk]
    scale_inv = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale_inv[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :N, :K].to(FP8_DTYPE)
    return q.contiguous(), scale_inv.float().contiguous()


def check_fp8_pair(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], what: str) -> None:
    """ValueError naming ``what`` unless weight is float8_e4m3fn [N, K] with float scales [ceil(N/bn), ceil(K/bk)]."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"{what}: an FP8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} "
                         f"{list(weight.shape)}")
    want = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != want or not scale_inv.is_floating_point():
        raise ValueError(f"{what}: weight_scale_inv has shape {list(scale_inv.shape)} ({scale_inv.dtype}), expected "
                         f"float {list(want)} for a {list(weight.shape)} weight in {block[0]}x{block[1]} blocks")


class _KeepStorageDtypes(nn.Module):
    """Casting a model (``.to(dtype)``, ``.half()``) leaves these buffers' dtypes alone; device moves apply."""

    def _apply(self, fn, recurse=True):
        for name, buf in list(self._buffers.items()):
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        for name, p in list(self._parameters.items()):  # a bias follows the model's dtype like any parameter
            if p is not None:
                self._parameters[name] = nn.Parameter(fn(p.data), requires_grad=False)
        return self


class Fp8Linear(_KeepStorageDtypes):
    """A Linear with a block-FP8 weight: buffers ``weight`` (float8_e4m3fn [N, K]) and ``weight_scale_inv``
    (float32), named as the official checkpoints name them, so its state dict is the on-disk layout."""

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 block: tuple[int, int] = BLOCK) -> None:
        super().__init__()
        block = (int(block[0]), int(block[1]))
        check_fp8_pair(weight, weight_scale_inv, block, "Fp8Linear")
        self.block = block
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale_inv", weight_scale_inv.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int] = BLOCK) -> Fp8Linear:
        q, s = quantize_block_fp8(linear.weight.detach(), block)
        return cls(q, s, None if linear.bias is None else linear.bias.detach(), block)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by."""
        return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.weight, self.weight_scale_inv, self.block, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


class Fp8Experts(_KeepStorageDtypes):
    """Drop-in for ``qwen35.model.moe.Experts`` with block-FP8 expert weights, stored per projection as the
    official checkpoints store each expert (``experts.E.{gate,up,down}_proj.weight`` + ``weight_scale_inv``):
    buffers ``gate_proj`` / ``up_proj`` [E, I, H], ``down_proj`` [E, H, I] float8_e4m3fn and their
    ``*_scale_inv`` [E, ceil(rows/bn), ceil(cols/bk)].  Gate and up stay separate because their block grids only
    line up with a fused [2I, H] grid when I is a multiple of the block height."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, block: tuple[int, int] = BLOCK,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.block = (int(block[0]), int(block[1]))
        bn, bk = self.block
        for part in EXPERT_PARTS:
            rows, cols = (hidden, intermediate) if part == "down_proj" else (intermediate, hidden)
            self.register_buffer(part, torch.empty(n_experts, rows, cols, dtype=FP8_DTYPE, device=device))
            self.register_buffer(f"{part}_scale_inv", torch.empty(n_experts, -(-rows // bn), -(-cols // bk),
                                                                  dtype=torch.float32, device=device))

    @classmethod
    def from_experts(cls, experts, block: tuple[int, int] = BLOCK) -> Fp8Experts:
        """Quantize a float ``Experts`` bank (fused gate_up [E, 2I, H], down [E, H, I]), one expert at a time."""
        I = experts.intermediate
        E, _, H = experts.gate_up_proj.shape
        new = cls(E, H, I, block, device=experts.gate_up_proj.device)
        for e in range(E):
            gu = experts.gate_up_proj[e].detach()
            new.set_expert(e, "gate_proj", *quantize_block_fp8(gu[:I], block))
            new.set_expert(e, "up_proj", *quantize_block_fp8(gu[I:], block))
            new.set_expert(e, "down_proj", *quantize_block_fp8(experts.down_proj[e].detach(), block))
        return new

    def set_expert(self, e: int, part: str, weight: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Write expert ``e``'s ``part`` (gate_proj / up_proj / down_proj) from its FP8 weight and scales."""
        if part not in EXPERT_PARTS:
            raise ValueError(f"expert part must be one of {EXPERT_PARTS}, got {part!r}")
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert {e} is outside 0..{self.n_experts - 1}")
        bank = getattr(self, part)
        what = f"experts.{e}.{part}"
        check_fp8_pair(weight, scale_inv, self.block, what)
        if tuple(weight.shape) != tuple(bank.shape[1:]):
            raise ValueError(f"{what}: weight has shape {list(weight.shape)}, expected {list(bank.shape[1:])}")
        bank[e].copy_(weight)
        getattr(self, f"{part}_scale_inv")[e].copy_(scale_inv)

    def expert(self, e: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 weight, float32 scale_inv) of expert ``e``'s ``part``: views into the banks."""
        return getattr(self, part)[e], getattr(self, f"{part}_scale_inv")[e]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) in float32: the float bank this one multiplies by."""
        def deq(part):
            return torch.stack([dequantize_fp8_blocks(*self.expert(e, part), self.block)
                                for e in range(self.n_experts)])
        return torch.cat([deq("gate_proj"), deq("up_proj")], dim=1), deq("down_proj")

    def project(self, part: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, *self.expert(e, part), self.block)

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        def expert(e: int, xs: torch.Tensor) -> torch.Tensor:
            h = swiglu(self.project("gate_proj", e, xs), self.project("up_proj", e, xs))
            return self.project("down_proj", e, h)

        return grouped_experts(x, routing.experts, routing.weights, self.n_experts, expert)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, intermediate={self.intermediate}, block={self.block}"


def fp8_converts(module_name: str) -> bool:
    """Whether the FP8 recipe converts the Linear / expert bank called ``module_name`` (our module names:
    ``model.layers.N...``, ``mtp.layers.N...``, ``lm_head``, ``visual...``)."""
    return not module_name.startswith("visual") and not module_name.endswith(KEEP) \
        and module_name != "model.embed_tokens"


def quantize_fp8(model: nn.Module, block: tuple[int, int] = BLOCK) -> nn.Module:
    """Replace the model's Linear layers and expert banks by block-FP8 ones (the official recipe, :data:`KEEP`
    excepted), in place, one module at a time (the peak is one module's float32 copy over the model)."""
    from ..model.moe import Experts

    def convert(full: str, child: nn.Module):
        if not fp8_converts(full):
            return None
        if isinstance(child, nn.Linear):
            return lambda m: Fp8Linear.from_linear(m, block)
        return (lambda m: Fp8Experts.from_experts(m, block)) if isinstance(child, Experts) else None

    return replace_modules(model, convert, "fp8")


__all__ = ["BLOCK", "EXPERT_PARTS", "FP8_DTYPE", "FP8_MAX", "Fp8Experts", "Fp8Linear", "KEEP", "check_fp8_pair",
           "fp8_converts", "quantize_block_fp8", "quantize_fp8"]
