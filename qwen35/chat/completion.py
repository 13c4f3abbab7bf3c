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
assistant turn is *prefilled*: thinking is skipped (an empty ``<think>\\n\\n</think>\\n\\n`` block, which is what
the template renders with thinking off), then the prompt ends with the opening of a call, ``<tool_call>\\n<function=``,
followed by ``NAME>\\n`` for a named function (or for "required" with a single tool, where the name is not in doubt).
The prefilled text plus the generated text are parsed together.  The rest of the call is then enforced by a grammar
(grammar-constrained decoding, :attr:`ChatPrompt.structured`, needs ``llguidance``): one of the tools' names, then
the parameters in the order of the tool's schema, every required one present, each value of its type, in exactly
the format the parser reads (see :func:`tool_call_grammar`), so a call that is not cut off by ``max_tokens``
always parses into arguments that validate against the tool's schema.  A named choice asks for exactly one call,
so generation also stops at the first ``</tool_call>`` (``parallel_tool_calls=False`` does the same for any call).

``response_format``
-------------------
OpenAI's shapes: ``{"type": "text"}`` (the default), ``{"type": "json_object"}`` (the answer is one JSON object) and
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (one JSON value valid
against the schema), enforced by the same grammar mechanism.  With thinking on the reasoning stays free text and the
constraint starts after ``</think>``.  With tools in "auto" mode the answer is either the JSON or tool calls; a
forced call (above) takes precedence over ``response_format``.

``finish_reason`` is ``"tool_calls"`` when at least one call was parsed and generation ended normally; a call cut
off by ``max_tokens`` keeps ``"length"`` so that a client can tell its arguments may be incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .parsers import (
    FUNCTION_END,
    FUNCTION_START,
    PARAMETER_END,
    PARAMETER_START,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ReasoningStreamParser,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    _schema_types,
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
    "normalize_response_format",
    "normalize_tool_choice",
    "parse_chat_output",
    "tool_call_grammar",
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
    # The grammar the output must follow, as the fields of the engine's StructuredSpec (kind, value, after, strict);
    # None: free text.  ``structured_source`` names the request field it comes from, for error messages.
    structured: dict[str, Any] | None = None
    structured_source: str | None = None  # "response_format" or "tools"

    def sampling_params(self, params: Any) -> Any:
        """``params`` (engine SamplingParams, a frozen dataclass) with this prompt's extra stop strings and its
        grammar added (the prompt's grammar replaces one the caller's params carry)."""
        changes: dict[str, Any] = {}
        extra = tuple(s for s in self.stop if s not in params.stop)
        if extra:
            changes["stop"] = params.stop + extra
        if self.structured is not None:
            changes["structured"] = dict(self.structured)
        return dataclasses.replace(params, **changes) if changes else params


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
    response_format: Mapping[str, Any] | None = None,
) -> ChatPrompt:
    """Render a conversation for generation (see the module docstring for ``tool_choice`` and ``response_format``).

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
    answer_format = normalize_response_format(response_format)

    force_call = mode == "required"
    text = tokenizer.apply_chat_template(_canonical_roles(messages), tools=tools if mode != "none" else None,
                                         enable_thinking=thinking and not force_call, **kwargs)
    prefill = ""
    name = None
    if force_call:
        if _opens_think(text):  # a template that thinks regardless: close the block ourselves
            text += f"\n{THINK_END}\n\n"
        name = forced or (tools[0]["function"]["name"] if len(tools) == 1 else None)
        prefill = f"{TOOL_CALL_START}\n{FUNCTION_START}" + (f"{name}>\n" if name else "")
        text += prefill
    one_call = forced is not None or (mode != "none" and not parallel_tool_calls)
    thinking_out = not force_call and _opens_think(text)
    structured: dict[str, Any] | None = None
    source: str | None = None
    if force_call:
        grammar = tool_call_grammar(tools, forced=forced, name_prefilled=name is not None, opened=True,
                                    parallel=not one_call)
        structured, source = {"kind": "lark", "value": grammar}, "tools"
    elif answer_format is not None:
        if mode == "auto":  # the answer is the JSON, or tool calls
            grammar = tool_call_grammar(tools, parallel=not one_call, alternative=answer_format)
            structured, source = {"kind": "lark", "value": grammar}, "response_format"
        else:
            structured, source = dict(answer_format), "response_format"
        if thinking_out:  # the reasoning is free; the format applies to the answer after it
            structured["after"] = THINK_END
            # the parser ends the reasoning at a tool call too: the grammar must not let one pass as reasoning
            structured["after_excludes"] = (TOOL_CALL_START,)
    return ChatPrompt(text=text, prefill=prefill, thinking=thinking_out,
                      tools=tools if mode != "none" else None, tool_choice=mode, forced_function=forced,
                      stop=(TOOL_CALL_END,) if one_call else (), structured=structured, structured_source=source)


# =============================================================================================
# structured output: response_format and the tool-call grammar

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RESPONSE_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}

# The markers that end a parameter value in the parser; a value may contain none of them, so that the first one
# the parser meets is the one the grammar wrote.
_VALUE_MARKERS = (PARAMETER_END, PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
# JSON as the chat template writes it (tojson): no free whitespace, which a model that does not know JSON fills
# with spaces until max_tokens.  Lenient: a schema keyword the compiler cannot enforce is ignored, not an error.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def normalize_response_format(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` -> the fields of an engine StructuredSpec, or None for plain text.

    Raises ``ValueError`` naming the field (``response_format...``) for a malformed value.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be an object such as {{'type': 'json_object'}}, got "
                         f"{type(response_format).__name__}")
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in _RESPONSE_FORMAT_KEYS:
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    unknown = sorted(set(response_format) - _RESPONSE_FORMAT_KEYS[kind])
    if unknown:
        raise ValueError(f"response_format has unknown field(s) for type {kind!r}: {', '.join(unknown)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"kind": "json_object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
    unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise ValueError(f"response_format.json_schema has unknown field(s): {', '.join(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
    if "description" in spec and not isinstance(spec["description"], str):
        raise ValueError("response_format.json_schema.description must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict must be true, false or null, got {strict!r}")
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise ValueError(f"response_format.json_schema.schema must be a JSON schema object, got "
                         f"{type(schema).__name__}")
    return {"kind": "json_schema", "value": dict(schema), "strict": bool(strict)}


def _lark_string(text: str) -> str:
    """A Lark string literal for ``text``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") \
        .replace("\t", "\\t")
    return f'"{escaped}"'


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def _regex_char(ch: str) -> str:
    # only the metacharacters: in newer regex syntax an escaped '<' or '>' is a word boundary
    return "\\" + ch if ch in _REGEX_META else ch


def _no_markers_regex(markers: Sequence[str] = _VALUE_MARKERS) -> str:
    """A regex for any text that contains none of ``markers`` (each starting with '<' and holding no other '<').

    The text is cut into pieces: a character other than '<'; or '<' followed by a proper prefix ``p`` of a marker's
    tail and then a character that does not continue any marker (nor is '<'); or '<' + ``p`` right before another
    '<' or the end.  A marker can only start at a '<', and no piece completes one.
    """
    tails = [m[1:] for m in markers]
    assert all(m.startswith("<") and "<" not in t for m, t in zip(markers, tails))
    prefixes = sorted({t[:k] for t in tails for k in range(len(t))})
    partial = "(?:" + "|".join("".join(_regex_char(c) for c in p) for p in prefixes if p) + ")?"
    breaks = []
    for p in prefixes:
        nxt = sorted({t[len(p)] for t in tails if t.startswith(p) and len(t) > len(p)})
        breaks.append("".join(_regex_char(c) for c in p) + "[^<" + "".join(_regex_char(c) for c in nxt) + "]")
    broken = "<(?:" + "|".join(breaks) + ")"
    return f"(?:[^<]|(?:<{partial})*{broken})*(?:<{partial})*"


_TEXT_VALUE = _no_markers_regex()


def _resolve(schema: Any, root: Mapping[str, Any]) -> Any:
    """Follow a local ``$ref`` (``#/$defs/X``, ``#/definitions/X``) of a tool's parameter schema, a few levels."""
    for _ in range(8):
        if not isinstance(schema, Mapping) or not isinstance(schema.get("$ref"), str):
            return schema
        ref = schema["$ref"]
        target: Any = None
        for section in ("$defs", "definitions"):
            prefix = f"#/{section}/"
            if ref.startswith(prefix) and isinstance(root.get(section), Mapping):
                target = root[section].get(ref[len(prefix):])
        if target is None:
            return schema
        schema = target
    return schema


def _types(schema: Any, root: Mapping[str, Any]) -> set[str]:
    """JSON types a schema admits, as the parser's convert_parameter reads them (empty: unknown)."""
    return _schema_types(schema, lambda sub: _resolve(sub, root))


def _guard_strings(schema: Any) -> Any:
    """A copy of a JSON schema whose free strings may not contain a parameter-ending marker (strings nested in an
    object or array parameter are written inside the parameter's value)."""
    if isinstance(schema, list):
        return [_guard_strings(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: (_guard_strings(v) if k not in ("enum", "const", "default", "examples") else v)
           for k, v in schema.items()}
    declared = schema.get("type")
    is_string = declared == "string" or (isinstance(declared, list) and "string" in declared)
    if is_string and not ({"pattern", "enum", "const", "format"} & schema.keys()):
        out["pattern"] = f"^{_TEXT_VALUE}$"
    if isinstance(schema.get("properties"), Mapping):  # property names are not schemas
        out["properties"] = {k: _guard_strings(v) for k, v in schema["properties"].items()}
    return out


def _pattern_regex(pattern: str) -> str:
    """A JSON-schema ``pattern`` (a search, unless anchored) as a Lark regex body matching the whole value."""
    body = pattern.replace("\\/", "/").replace("/", "\\/")
    head = "" if body.startswith("^") else "(?s:.*)"
    body = body[1:] if body.startswith("^") else body
    anchored_end = body.endswith("$") and not body.endswith("\\$")
    tail = "" if anchored_end else "(?s:.*)"
    body = body[:-1] if anchored_end else body
    return f"{head}(?:{body}){tail}"


def _parameter_rules(key: str, pname: str, schema: Any, root: Mapping[str, Any], rules: list[str]) -> str:
    """Rules for one ``<parameter=NAME>`` block; returns the rule name."""
    head = _lark_string(f"{PARAMETER_START}{pname}>\n")
    end = _lark_string(f"\n{PARAMETER_END}\n")
    resolved = _resolve(schema, root)
    types = _types(schema, root)
    if types and "string" not in types:
        # a typed value is JSON text (convert_parameter parses it by the schema)
        full = dict(resolved) if isinstance(resolved, Mapping) else {}
        for section in ("$defs", "definitions"):  # keep the tool's definitions for the refs inside
            if isinstance(root.get(section), Mapping) and section not in full:
                full[section] = root[section]
        full = _guard_strings(full)
        full["x-guidance"] = {**_JSON_OPTIONS, **(full.get("x-guidance") or {})}
        rules.append(f"{key}: {head} {key}_json {end}")
        rules.append(f"{key}_json: %json {json.dumps(full, ensure_ascii=False)}")
        return key
    # a string (or untyped) value is raw text, kept verbatim by the parser: no marker may occur in it
    value = "TEXT_VALUE"
    if isinstance(resolved, Mapping):
        options = list(resolved.get("enum") or []) + ([resolved["const"]] if "const" in resolved else [])
        if options:
            texts = [o if isinstance(o, str) else json.dumps(o, ensure_ascii=False) for o in options]
            value = "(" + " | ".join(_lark_string(t) for t in texts) + ")"
        elif types <= {"string", "null"}:
            lo, hi = resolved.get("minLength"), resolved.get("maxLength")
            if isinstance(lo, int) or isinstance(hi, int):
                lo = lo if isinstance(lo, int) and lo > 0 else 0
                hi_text = str(hi) if isinstance(hi, int) and hi >= 0 else ""
                value = f"({value} & /(?s:.){{{lo},{hi_text}}}/)"
            if isinstance(resolved.get("pattern"), str):
                value = f"({value} & /{_pattern_regex(resolved['pattern'])}/)"
    terminal = key.upper() + "_VALUE"
    rules.append(f"{key}: {head} {terminal}")
    rules.append(f"{terminal}: {value} {end}")
    return key


def _function_rules(k: int, function: Mapping[str, Any], rules: list[str]) -> str:
    """Rules for the parameters of one function (schema order; required ones mandatory); returns the rule name."""
    parameters = function.get("parameters") if isinstance(function.get("parameters"), Mapping) else {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), Mapping) else {}
    required = [r for r in parameters.get("required") or () if isinstance(r, str)]
    names = list(properties) + [r for r in required if r not in properties]
    parts = []
    for j, pname in enumerate(names):
        writable = pname and pname == pname.strip() and not re.search(r"[>\n]", pname)
        if not writable:
            if pname in required:
                raise ValueError(f"tools: the required parameter {pname!r} of {function['name']!r} cannot be written "
                                 "in a tool call (a name may not contain '>' or a line break, nor start or end with "
                                 "whitespace)")
            continue
        rule = _parameter_rules(f"f{k}_p{j}", pname, properties.get(pname), parameters, rules)
        parts.append(rule if pname in required else f"{rule}?")
    rules.append(f"f{k}_args: {' '.join(parts)}" if parts else f'f{k}_args: ""')
    return f"f{k}_args"


def tool_call_grammar(tools: Sequence[Mapping[str, Any]] | None, *, forced: str | None = None,
                      name_prefilled: bool = False, opened: bool = False, parallel: bool = True,
                      alternative: Mapping[str, Any] | None = None) -> str:
    """A grammar (llguidance's Lark dialect) for tool calls in Qwen's XML format, as the template writes them::

        <tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>

    Parameters come in the order of the tool's schema, required ones always, optional ones maybe.  A value whose
    schema admits only non-string types is JSON of that schema (``%json``, with free strings inside it kept clear of
    the markers); a string value is raw text containing none of ``</parameter>``, ``<parameter=``, ``</function>``,
    ``</tool_call>`` (so the parser's reading of the value is never in doubt), limited to the schema's ``enum`` /
    ``const``, ``minLength`` / ``maxLength`` and ``pattern`` where given (``format`` is not enforced).

    ``opened``: the output continues a prefilled ``<tool_call>\\n<function=`` (and ``NAME>\\n`` too when
    ``name_prefilled``); ``forced`` restricts the call to that function.  ``parallel``: further calls may follow,
    each on a new line.  ``alternative`` (a response_format spec): the output is that JSON *or* the calls.
    """
    functions = [t["function"] for t in tools or ()]
    if forced is not None:
        functions = [f for f in functions if f["name"] == forced]
    rules: list[str] = []
    choices = []
    for k, function in enumerate(functions):
        args = _function_rules(k, function, rules)
        rules.append(f"f{k}: {_lark_string(function['name'] + '>' + chr(10))} {args} "
                     f"{_lark_string(FUNCTION_END + chr(10) + TOOL_CALL_END)}")
        choices.append(f"f{k}")
    call_start = _lark_string(f"{TOOL_CALL_START}\n{FUNCTION_START}")
    rules.append(f"function: {' | '.join(choices)}")
    rules.append(f"call: {call_start} function")
    more = ' ("\\n" call)*' if parallel else ""
    if opened:
        first = f"f0_args {_lark_string(FUNCTION_END + chr(10) + TOOL_CALL_END)}" if name_prefilled else "function"
        top = f"start: {first}{more}"
    else:
        top = f"start: call{more}"
        if alternative is not None:
            schema = alternative.get("value") if alternative.get("kind") == "json_schema" else {"type": "object"}
            options = {**_JSON_OPTIONS, "lenient": not alternative.get("strict", False)}
            body = dict(schema) if isinstance(schema, Mapping) else schema
            if isinstance(body, dict):
                body["x-guidance"] = {**options, **(body.get("x-guidance") or {})}
            rules.append(f"answer: %json {json.dumps(body, ensure_ascii=False)}")
            top = f"start: answer | call{more}"
    if any("TEXT_VALUE" in r for r in rules):  # one definition, shared by the string parameters
        rules.append(f"TEXT_VALUE: /{_TEXT_VALUE}/")
    return "\n".join([top] + rules) + "\n"


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
