"""qwen35: the Qwen3.5 / Qwen3.6 model family in PyTorch.

Importing the package is cheap; torch and the model load on first use of what needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["load_model", "load_config", "ConfigError", "CheckpointError", "LLM", "AsyncLLM", "SamplingParams",
           "StructuredSpec", "MediaPolicy", "VisionInput",
           "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointError, load_model
    from .config import ConfigError, load_config
    from .engine import AsyncLLM, SamplingParams, StructuredSpec, VisionInput
    from .llm import LLM, MediaPolicy


def __getattr__(name: str) -> Any:
    if name in ("load_model", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "LLM":
        from . import llm
        return llm.LLM
    if name == "MediaPolicy":
        from . import llm
        return llm.MediaPolicy
    if name in ("AsyncLLM", "SamplingParams", "StructuredSpec", "VisionInput"):
        from . import engine
        return getattr(engine, name)
    if name in ("load_config", "ConfigError"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'qwen35' has no attribute {name!r}")
