"""The token-level inference engine: hybrid paged cache, continuous batching scheduler, runner, sampler.

``LLMEngine`` steps synchronously; ``AsyncLLM`` drives it on a thread for servers.  The text-level facade with the
tokenizer, chat template and parsers is :class:`qwen35.LLM` (``qwen35/llm.py``); nothing here imports the chat
layer, checkpoint loading or quantization.
"""

from .async_llm import AsyncLLM
from .llm_engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from .multimodal import VisionInput
from .params import SamplingParams, StructuredSpec

__all__ = ["AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
           "StructuredSpec", "VisionInput"]
