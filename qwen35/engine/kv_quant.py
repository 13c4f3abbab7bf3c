"""The KV cache's storage formats: the model dtype, or int8 / float8_e4m3fn with a scale per token per KV head.

Why: at long context the attention layers' KV is most of a sequence's memory and most of what a decode step
reads; one byte per value instead of two halves both (the DeltaNet layers' fixed state is untouched).

``kv_cache_dtype``:

* ``"auto"``: keys and values in the model dtype (no quantization);
* ``"int8"``: symmetric int8, ``scale = max|row| / 127`` per token per KV head (a row = head_dim values);
* ``"fp8"``: float8_e4m3fn, ``scale = max|row| / 448`` per token per KV head.

Scales are float32: 4 bytes per head_dim values (1.6% of the int8 bytes at head_dim 256).  bf16 scales would
save 0.8% but add up to 2^-9 relative error to every value of the row -- as much as int8's own rounding step at
the row's median magnitude -- and the attention kernel reads float32 without a conversion.

A token's K and V are quantized when they are written into their block rows (:meth:`LayerKV.write`) and every
read sees the quantized values: the decode kernel dequantizes rows in registers as it reads them in place, a
prompt chunk gathers its history and dequantizes it (:meth:`LayerKV.gather`).  Since each row is quantized on
its own, whatever path wrote a token -- one prompt, prompt chunks, recompute after preemption, a prefix-cache hit
sharing the block -- leaves the same bytes, so the engine's paths agree with each other as they do without
quantization.  The scales live beside the blocks in pools of their own ([rows, Hkv]), addressed by the same
block table (row = block · block_size + offset), and travel with the rows wherever the cache copies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.ops import dequantize_kv, kv_write_quant, paged_decode_attention

# the choices, and the storage dtype each one gives (None: the model dtype)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_DTYPE = torch.float32
_MODEL_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_kv_cache_dtype(name: object) -> str:
    """The validated ``kv_cache_dtype`` name; anything else is a ValueError listing the choices."""
    if not isinstance(name, str) or name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not a KV cache format; choose one of "
                         f"{', '.join(KV_CACHE_DTYPES)} (auto: the model dtype; int8 / fp8: one byte per value "
                         "plus a float32 scale per token per KV head)")
    return name


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the key and value pools."""
    return KV_CACHE_DTYPES[check_kv_cache_dtype(kv_cache_dtype)] or model_dtype


def is_quantized(kv_cache_dtype: str) -> bool:
    return KV_CACHE_DTYPES[check_kv_cache_dtype(kv_cache_dtype)] is not None


def memory_name(kv_cache_dtype: str, model_dtype: torch.dtype) -> str:
    """The name ``qwen35.memory`` (``kv_bytes_per_token``, ``qwen35 info --kv-cache-dtype``) knows the format by."""
    return kv_cache_dtype if is_quantized(kv_cache_dtype) else _MODEL_DTYPE_NAMES[model_dtype]


@dataclass
class LayerKV:
    """The K and V rows of one attention layer ([rows, Hkv, d] each), and for a quantized cache their scales
    ([rows, Hkv] float32 each; None otherwise)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    @classmethod
    def allocate(cls, rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str = "cpu"
                 ) -> LayerKV:
        """Zeroed pools; ``dtype`` int8 / float8_e4m3fn adds the scale pools."""
        keys = torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device)
        quantized = dtype in (torch.int8, torch.float8_e4m3fn)
        scales = [torch.zeros(rows, kv_heads, dtype=SCALE_DTYPE, device=device) if quantized else None
                  for _ in range(2)]
        return cls(keys, torch.zeros_like(keys), *scales)

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor whose dim 0 is the pool row (what a copy of rows must move)."""
        return [t for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens' keys / values [n, Hkv, d] at pool ``rows`` [n] (quantized on the way in)."""
        if not self.quantized:
            self.keys.index_copy_(0, rows, k)
            self.values.index_copy_(0, rows, v)
            return
        kv_write_quant(self.keys, self.key_scales, rows, k)
        kv_write_quant(self.values, self.value_scales, rows, v)

    def gather(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of pool ``rows`` [L] as [L, Hkv, d] in ``dtype`` (dequantized when quantized)."""
        if not self.quantized:
            return self.keys.index_select(0, rows), self.values.index_select(0, rows)
        return (dequantize_kv(self.keys.index_select(0, rows), self.key_scales.index_select(0, rows), dtype),
                dequantize_kv(self.values.index_select(0, rows), self.value_scales.index_select(0, rows), dtype))

    def decode_attention(self, q: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                         scale: float) -> torch.Tensor:
        """One query per sequence over its history in these pools (see ``ops.paged_decode_attention``)."""
        return paged_decode_attention(q, self.keys, self.values, tables, lengths, block_size, scale,
                                      key_scales=self.key_scales, value_scales=self.value_scales)
