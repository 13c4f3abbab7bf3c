"""Chat-template rendering: OpenAI-style messages -> Qwen3.5 prompt text.

Templates are untrusted code (checkpoints ship their own), so they run in jinja2's immutable
sandbox with the same helpers and whitespace settings as Hugging Face's ``apply_chat_template``
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that keeps non-ASCII text,
``raise_exception``, ``strftime_now``), so a template renders the same text here as in
transformers.

Inputs are checked before rendering: a bad request should produce an error that names the
offending message and field, not a jinja traceback from deep inside a template.  What the template
itself rejects (a misplaced system message, no user query...) comes back as
:class:`ChatTemplateError` carrying the template's own message.  Both are ``ValueError`` so a
server can map them to HTTP 400 in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplateError",
    "MESSAGE_ROLES",
    "default_template_source",
    "render_chat",
    "validate_messages",
    "validate_tools",
]

MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# Older or alternative names under which clients send an assistant turn's reasoning; copied to
# ``reasoning_content``, the field Qwen templates read (transformers does the same aliasing).
_REASONING_ALIASES = ("reasoning_content", "reasoning", "thinking")

_CONTENT_PART_TYPES = ("text", "image", "image_url", "video", "video_url")
_MEDIA_KEYS = frozenset(_CONTENT_PART_TYPES) - {"text"}


class ChatTemplateError(ValueError):
    """The chat template refused the conversation or failed while rendering it."""


class _RaisedByTemplate(jinja2.TemplateError):
    """Marks errors a template raised on purpose through ``raise_exception``."""


@lru_cache(maxsize=1)
def default_template_source() -> str:
    """Source text of the chat template shipped with the package (``templates/qwen35.jinja``)."""
    return resources.files(__package__).joinpath("templates", "qwen35.jinja").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# jinja environment


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's built-in tojson HTML-escapes '<', '>' and '&' (it is meant for HTML pages), which
    # would corrupt tool schemas in a prompt; HF templates expect plain json.dumps behaviour.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc


# --------------------------------------------------------------------------------------------
# input validation


def _plain(value: Any, where: str, media: bool = False) -> Any:
    """Deep copy of JSON-like data made only of plain dict/list/str/int/float/bool/None.

    Templates run in a sandbox, but objects with their own methods widen what a template can
    reach; plain copies also guarantee that rendering never mutates the caller's messages.
    Media payloads (the value under an ``image``/``video`` key, e.g. a decoded picture) become
    an inert placeholder naming their type: templates only test that the key is there.
    Anything else that is not JSON data is an error.
    """
    if value is None or type(value) in (str, int, bool):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{where} is not a finite number")
        return value
    if isinstance(value, str):  # str subclasses (enums...) lose their extra behaviour
        return str.__str__(value)
    if isinstance(value, int):  # int subclasses (IntEnum...); bool cannot be subclassed
        return int.__int__(value)
    if isinstance(value, float):
        return _plain(float.__float__(value), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}")
            out[str.__str__(key)] = _plain(item, f"{where}.{key}", media or key in _MEDIA_KEYS)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", media) for i, item in enumerate(value)]
    if callable(getattr(value, "model_dump", None)):  # pydantic models from a server layer
        return _plain(value.model_dump(), where, media)
    if media:
        return f"<{type(value).__name__}>"
    raise ValueError(f"{where} has an unsupported value of type {type(value).__name__}")


def _check_content(content: Any, where: str) -> None:
    """Check a message's (plain-copied) content, and give video_url parts the key templates read."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string, a list of content parts, or null")
    for j, part in enumerate(content):
        part_where = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ValueError(f"{part_where} must be an object with a 'type'")
        kind = part.get("type")
        if kind is None:
            # Parts without a type are accepted when their payload key says what they are.
            kind = next((k for k in _CONTENT_PART_TYPES if k in part), None)
        if kind not in _CONTENT_PART_TYPES:
            raise ValueError(f"{part_where}.type {kind!r} is not one of {', '.join(_CONTENT_PART_TYPES)}")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"{part_where}.text must be a string")
        if kind == "video_url" and "video" not in part:
            # Qwen's templates know an image by its 'image_url' key but a video only by 'video' (transformers'
            # form), so OpenAI-style video parts would fail to render; vLLM renames them the same way.  The
            # content is this function's own plain copy, so the caller's message is untouched.
            part["video"] = part["video_url"]


def _canonical_tool_call(call: Any, where: str) -> dict[str, Any]:
    """One assistant tool call in ``{"type": "function", "function": {"name", "arguments": {...}}}``
    form; OpenAI clients send ``arguments`` as a JSON string, the template needs a mapping."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object")
    call = dict(call)
    bare = "function" not in call  # a bare {"name", "arguments"} is accepted too
    function = dict(call) if bare else call["function"]
    fn_where = where if bare else f"{where}.function"
    if not isinstance(function, dict):
        raise ValueError(f"{fn_where} must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{fn_where}.name must be a non-empty string")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{fn_where}.arguments is not valid JSON: {exc.msg}") from exc
    if not isinstance(arguments, dict):
        raise ValueError(f"{fn_where}.arguments must be a JSON object")
    if bare:
        call = {key: value for key, value in call.items() if key in ("id", "type")}
        function = {"name": name}
    call["type"] = call.get("type") or "function"
    call["function"] = {**function, "name": name, "arguments": arguments}
    return call


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return a plain, canonical copy ready for a template.

    Canonical means: reasoning sent as ``reasoning``/``thinking`` is also available as
    ``reasoning_content``; tool-call arguments are mappings (JSON strings are decoded); a
    ``video_url`` content part also carries its URL under ``video`` (what templates look for).
    Raises ``ValueError`` naming the message index and field at fault.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, Mapping) and not callable(getattr(raw, "model_dump", None)):
            raise ValueError(f"{where} must be an object with a 'role'")
        message = _plain(raw, where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"{where}.role {role!r} is not one of {', '.join(MESSAGE_ROLES)}")
        _check_content(message.get("content"), f"{where}.content")

        reasoning = None
        for key in _REASONING_ALIASES:
            value = message.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{where}.{key} must be a string")
            if reasoning is None:
                reasoning = value
        if reasoning is not None:
            if role != "assistant":
                raise ValueError(f"{where} has reasoning but only assistant messages can")
            message["reasoning_content"] = reasoning

        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"{where}.tool_calls is only allowed on assistant messages")
            if not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list")
            message["tool_calls"] = [_canonical_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(message)
    return out


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Check OpenAI-style function tools and return a plain copy (``None`` for no tools).

    Each tool must look like ``{"type": "function", "function": {"name": ..., "parameters": {...}}}``;
    ``parameters`` (a JSON schema object) may be left out for a function without arguments.
    """
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list")
    out: list[dict[str, Any]] = []
    for k, raw in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(raw, Mapping) and not callable(getattr(raw, "model_dump", None)):
            raise ValueError(f"{where} must be an object")
        tool = _plain(raw, where)
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        out.append(tool)
    return out or None


# --------------------------------------------------------------------------------------------
# rendering


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool | None = True,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **kwargs: Any,
) -> str:
    """Render a conversation to prompt text.

    ``enable_thinking=None`` leaves the variable undefined, so the template's own default applies (the
    official 0.8B / 2B templates think only when it is true; the larger ones unless it is false).

    ``template`` is jinja source text; ``None`` uses the Qwen3.5 template shipped with the
    package.  Extra keyword arguments (e.g. ``add_vision_id``) are passed to the template as
    variables.  Raises ``ValueError`` for malformed input and :class:`ChatTemplateError` (also a
    ``ValueError``) for what the template rejects.
    """
    canonical_messages = validate_messages(messages)
    canonical_tools = validate_tools(tools)
    variables = _plain(kwargs, "chat template argument")
    compiled = _compile(default_template_source() if template is None else template)
    try:
        return compiled.render(
            messages=canonical_messages,
            tools=canonical_tools,
            add_generation_prompt=bool(add_generation_prompt),
            **({} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}),
            **variables,
        )
    except _RaisedByTemplate as exc:
        raise ChatTemplateError(str(exc.message)) from exc
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # Filters applied to data of the wrong shape (e.g. ``items`` on a string) end up here.
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
