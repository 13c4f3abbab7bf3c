"""Chat completions: messages + tools in, reasoning + answer + tool calls out.

The logic shared by :meth:`qwen35.LLM.chat` and the OpenAI-compatible server, with no engine or HTTP in it:

* :func:`build_chat_prompt` renders the conversation with the chat template and decides how the output will be
  read: whether generation starts inside an open ``<think>`` block, which tools the answer is parsed against,
  and which text the assistant turn is forced to start with (``tool_choice``, below);
* :class:`ChatStreamProcessor` turns generated text deltas into reasoning / content / tool-call deltas, and
  :func:`parse_chat_output` is the same thing in one go, so the streamed deltas always concatenate to the
  non-streamed result;
* :func:`chat_result` packs an engine :class:`~qwen35.engine.RequestOutput` into a :class:`ChatResult`.

``tool_choice``
---------------
``"auto"`` (the default when tools are given): tools are rendered into the system turn and calls are parsed from
the answer.  ``"none"``: the conversation is rendered *without* the tools, so the model does not even know it could
call one, and nothing is parsed as a call.

``"required"`` and a named function (``{"type": "function", "function": {"name": NAME}}``) must force a call.  The
engine has no grammar-constrained decoding, so the call is forced by *prefilling* the assistant turn instead:
thinking is skipped (an empty ``<think>\\n\\n</think>\\n\\n`` block, which is what the template renders with thinking
off), then the prompt ends with the opening of a call, ``<tool_call>\\n<function=``, followed by ``NAME>\\n`` for a
named function (or for "required" with a single tool, where the name is not in doubt).  The model continues from
there, and the prefilled text plus the generated text are parsed together, so the result is a call.  What the model
writes after the prefix is not constrained: arguments may be incomplete, and for "required" with several tools the
model may write a function name that does not exist; such output is returned as plain content, never as an error.
A named choice asks for exactly one call, so generation also stops at the first ``</tool_call>``
(``parallel_tool_calls=False`` does the same for any call).

``finish_reason`` is ``"tool_calls"`` when at least one call was parsed and generation ended normally; a call cut
off by ``max_tokens`` keeps ``"length"`` so that a client can tell its arguments may be incomplete.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .parsers import (
    FUNCTION_START,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ReasoningStreamParser,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
)
from .template import validate_tools

__all__ = [
    "ChatChoice",
    "ChatDelta",
    "ChatPrompt",
    "ChatResult",
    "ChatStreamProcessor",
    "ParsedChat",
    "build_chat_prompt",
    "chat_finish_reason",
    "chat_result",
    "normalize_tool_choice",
    "parse_chat_output",
]

# Template variables the caller may not set through chat_template_kwargs: they are arguments of their own.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "template", "documents"})

# A function name must be safe to write inside ``<function=NAME>``: no '>', no newline, no spaces.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

ToolChoice = str | Mapping[str, Any] | None


# =============================================================================================
# prompt


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation and how its output is to be read."""

    text: str  # the prompt for the engine, prefill included
    prefill: str = ""  # start of the assistant turn forced by tool_choice (part of ``text``, parsed as output)
    thinking: bool = True  # generation starts inside an open <think> block
    tools: list[dict[str, Any]] | None = None  # tools the answer is parsed against; None: no tool-call parsing
    tool_choice: str = "none"  # "auto", "none" or "required" (a named function is "required" + forced_function)
    forced_function: str | None = None
    stop: tuple[str, ...] = ()  # stop strings the request needs on top of the caller's

    def sampling_params(self, params: Any) -> Any:
        """``params`` (engine SamplingParams, a frozen dataclass) with this prompt's extra stop strings added."""
        extra = tuple(s for s in self.stop if s not in params.stop)
        return dataclasses.replace(params, stop=params.stop + extra) if extra else params


def normalize_tool_choice(tool_choice: ToolChoice, tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, str | None]:
    """``(mode, function name)``: mode is "auto", "none" or "required"; a named choice is ("required", NAME).

    Raises ``ValueError`` for a malformed choice, or one that asks for a call while no (matching) tool is given.
    """
    names = [t["function"]["name"] for t in tools or ()]
    if tool_choice is None:
        return ("auto" if names else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs a non-empty tools list")
        if tool_choice == "auto" and not names:
            return "none", None
        return tool_choice, None
    if not isinstance(tool_choice, Mapping):
        raise ValueError(f"tool_choice must be a string or an object, got {type(tool_choice).__name__}")
    if tool_choice.get("type", "function") != "function":
        raise ValueError(f"tool_choice.type must be 'function', got {tool_choice.get('type')!r}")
    function = tool_choice.get("function")
    # the Responses API puts the name at the top level: {"type": "function", "name": ...}
    name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("tool_choice.function.name must be a non-empty string")
    if name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return "required", name


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    tools = validate_tools(tools)
    seen: set[str] = set()
    for k, tool in enumerate(tools or ()):
        function = tool["function"]
        name = function["name"]
        if not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"tools[{k}].function.name {name!r} must be 1-128 letters, digits, '_', '-', '.' or ':'")
        if name in seen:
            raise ValueError(f"tools[{k}].function.name {name!r} is defined twice")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None:
            declared = parameters.get("type", "object")
            if declared != "object":
                raise ValueError(f"tools[{k}].function.parameters.type must be 'object', got {declared!r}")
            properties = parameters.get("properties", {})
            if not isinstance(properties, Mapping) or not all(isinstance(v, Mapping) for v in properties.values()):
                raise ValueError(f"tools[{k}].function.parameters.properties must map names to JSON schemas")
    return tools


def _canonical_roles(messages: Any) -> Any:
    """OpenAI's newer "developer" role is the system role of older models; the template knows only "system"."""
    if not isinstance(messages, (list, tuple)):
        return messages
    out = []
    for m in messages:
        if isinstance(m, Mapping) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        out.append(m)
    return out


def _opens_think(prompt: str) -> bool:
    return prompt.rstrip().endswith(THINK_START)


def build_chat_prompt(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: ToolChoice = "auto",
    enable_thinking: bool | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
) -> ChatPrompt:
    """Render a conversation for generation (see the module docstring for ``tool_choice``).

    ``enable_thinking`` wins over ``chat_template_kwargs["enable_thinking"]``; when neither is given thinking is on
    (the Qwen3.5 default).  Whether the output starts inside a ``<think>`` block is read off the rendered prompt, so
    a checkpoint's own template with a different default is parsed correctly too.  Other ``chat_template_kwargs``
    are passed to the template as variables.  ``tokenizer`` needs an ``apply_chat_template`` method (the engine's
    :class:`~qwen35.chat.Tokenizer`).  Raises ``ValueError`` naming the field at fault for any malformed input.
    """
    tools = _check_tools(tools)
    mode, forced = normalize_tool_choice(tool_choice, tools)
    if chat_template_kwargs is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(chat_template_kwargs, Mapping):
        kwargs = dict(chat_template_kwargs)
    else:
        raise ValueError("chat_template_kwargs must be an object")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    from_kwargs = kwargs.pop("enable_thinking", None)
    thinking = enable_thinking if enable_thinking is not None else from_kwargs
    if thinking is None:
        thinking = True
    if not isinstance(thinking, bool):
        raise ValueError(f"enable_thinking must be true or false, got {thinking!r}")
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")

    force_call = mode == "required"
    text = tokenizer.apply_chat_template(_canonical_roles(messages), tools=tools if mode != "none" else None,
                                         enable_thinking=thinking and not force_call, **kwargs)
    prefill = ""
    if force_call:
        if _opens_think(text):  # a template that thinks regardless: close the block ourselves
            text += f"\n{THINK_END}\n\n"
        name = forced or (tools[0]["function"]["name"] if len(tools) == 1 else None)
        prefill = f"{TOOL_CALL_START}\n{FUNCTION_START}" + (f"{name}>\n" if name else "")
        text += prefill
    one_call = forced is not None or (mode != "none" and not parallel_tool_calls)
    return ChatPrompt(text=text, prefill=prefill, thinking=not force_call and _opens_think(text),
                      tools=tools if mode != "none" else None, tool_choice=mode, forced_function=forced,
                      stop=(TOOL_CALL_END,) if one_call else ())


# =============================================================================================
# output


@dataclass
class ChatDelta:
    """New output of one step: any of reasoning text, answer text and tool-call pieces."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def __iadd__(self, other: ChatDelta) -> ChatDelta:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


class ChatStreamProcessor:
    """Generated text deltas -> :class:`ChatDelta`; one per choice of a request.

    The reasoning parser runs first; the answer it lets through goes to the tool-call parser (when the request
    has tools).  A ``<tool_call>`` opened inside unterminated thinking ends the reasoning, so the call is found.
    The prefill of a forced tool call is fed as the first generated text, so it is parsed like model output.
    """

    def __init__(self, prompt: ChatPrompt) -> None:
        self._reasoning = ReasoningStreamParser(thinking=prompt.thinking)
        self._tools = ToolCallStreamParser(prompt.tools) if prompt.tools is not None else None
        self._pending = prompt.prefill

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._tools.calls) if self._tools is not None else []

    def feed(self, text: str) -> ChatDelta:
        text, self._pending = self._pending + text, ""
        step = self._reasoning.feed(text)
        return self._route(step.reasoning, step.content)

    def finish(self) -> ChatDelta:
        out = self.feed("") if self._pending else ChatDelta()
        end = self._reasoning.finish()
        out += self._route(end.reasoning, end.content)
        if self._tools is not None:
            tail = self._tools.finish()
            out += ChatDelta(content=tail.content, tool_calls=tail.tool_calls)
        return out

    def _route(self, reasoning: str, content: str) -> ChatDelta:
        if self._tools is None or not content:
            return ChatDelta(reasoning=reasoning, content=content)
        piece = self._tools.feed(content)
        return ChatDelta(reasoning=reasoning, content=piece.content, tool_calls=piece.tool_calls)


@dataclass
class ParsedChat:
    """One choice's output read as an assistant message."""

    reasoning: str | None  # None: no reasoning (thinking off, or nothing before </think>)
    content: str | None  # None only when the answer is nothing but tool calls (as OpenAI sends it)
    tool_calls: list[ToolCall]


def parse_chat_output(prompt: ChatPrompt, text: str) -> ParsedChat:
    """Read the whole generated ``text`` (without the prefill) of one choice; the same parse as streaming."""
    processor = ChatStreamProcessor(prompt)
    out = processor.feed(text)
    out += processor.finish()
    calls = processor.calls
    content: str | None = out.content
    if not content and calls:
        content = None
    return ParsedChat(reasoning=out.reasoning or None, content=content, tool_calls=calls)


def chat_finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    """OpenAI's finish_reason: the engine's ("stop", "length", "abort"), or "tool_calls" after a completed call."""
    if has_tool_calls and engine_reason == "stop":
        return "tool_calls"
    return engine_reason


@dataclass
class ChatChoice:
    index: int
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None  # "stop", "length", "tool_calls" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended generation
    text: str = ""  # the raw generated text (without a tool_choice prefill)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation for the next turn (reasoning included, which the
        template replays inside a tool loop and drops otherwise)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return msg


@dataclass
class ChatResult:
    """What :meth:`qwen35.LLM.chat` returns: one conversation's answer, ``choices`` holding all ``n`` of them.

    ``reasoning``, ``content``, ``tool_calls``, ``finish_reason``, ``token_ids`` and ``message`` are those of the
    first choice.
    """

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    choices: list[ChatChoice]

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in self.choices)
        prompt = len(self.prompt_token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def reasoning(self) -> str | None:
        return self.choices[0].reasoning

    @property
    def content(self) -> str | None:
        return self.choices[0].content

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def message(self) -> dict[str, Any]:
        return self.choices[0].message


def chat_result(prompt: ChatPrompt, output: Any) -> ChatResult:
    """Parse a finished engine output (an engine ``RequestOutput``) of a chat prompt."""
    choices = []
    for o in output.outputs:
        parsed = parse_chat_output(prompt, o.text)
        choices.append(ChatChoice(
            index=o.index, reasoning=parsed.reasoning, content=parsed.content, tool_calls=parsed.tool_calls,
            finish_reason=chat_finish_reason(o.finish_reason, bool(parsed.tool_calls)), stop_reason=o.stop_reason,
            text=o.text, token_ids=list(o.token_ids), logprobs=o.logprobs, top_logprobs=o.top_logprobs))
    return ChatResult(output.request_id, prompt.text, list(output.prompt_token_ids), choices)
