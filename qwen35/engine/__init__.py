"""The inference engine: hybrid paged cache, continuous batching scheduler, runner, sampler, Python API."""

from .llm import LLM, AsyncLLM
from .llm_engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from .params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
