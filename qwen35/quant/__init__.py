"""Weight quantization for CPU inference."""

from .int8 import Int8Experts, Int8Linear, quantize_int8

__all__ = ["quantize_int8", "Int8Linear", "Int8Experts"]
