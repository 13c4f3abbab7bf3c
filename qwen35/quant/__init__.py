"""Weight quantization for CPU inference."""

from .int8 import Int8Experts, Int8Linear, quantize_int8
from .fp8 import Fp8Experts, Fp8Linear, quantize_fp8
from .int4 import Int4Experts, Int4Linear, quantize_int4

__all__ = ["quantize_int8", "Int8Linear", "Int8Experts", "quantize_fp8", "Fp8Linear", "Fp8Experts",
           "quantize_int4", "Int4Linear", "Int4Experts"]
