"""The Qwen3.5 model, one file per mechanism (see transformer.py for the stack)."""

from .context import DenseContext, ForwardContext, SequenceCache
from .init import init_weights
from .transformer import CausalLMOutput, Qwen35ForCausalLM

__all__ = ["Qwen35ForCausalLM", "CausalLMOutput", "SequenceCache", "ForwardContext", "DenseContext", "init_weights"]
