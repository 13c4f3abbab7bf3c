"""Split Qwen3.5 model output into reasoning, answer text and tool calls.

Two independent stages, run in this order on generated text:

1. **Reasoning.**  With thinking on, the *prompt* already ends in ``<think>\\n``, so the model
   only ever generates the closing ``</think>``: everything before it is reasoning, everything
   after it is the answer.  Qwen3.5 sometimes starts a tool call inside its thinking without
   closing it first; a ``<tool_call>`` followed by ``<function=`` is therefore also taken as the
   end of the reasoning (and goes to the answer, where the tool parser finds it).  A bare
   mention of ``<tool_call>`` in prose does not end the reasoning.  With thinking off the prompt
   ends in an empty ``<think>\\n\\n</think>\\n\\n`` block and everything is answer.

2. **Tool calls** in the answer, in Qwen's XML form::

       <tool_call>
       <function=NAME>
       <parameter=ARG>
       VALUE
       </parameter>
       </function>
       </tool_call>

   Values are plain text; they are converted to JSON values using the tool's JSON schema (a
   ``string`` parameter stays text even when it looks like a number, e.g. a zip code "03106").
   Whatever cannot be understood as a call to a known function is given back as ordinary
   content: malformed model output must never turn into a server error.

Both stages come in a streaming form, fed text deltas as they are decoded, and a one-shot form.
Streaming never shows a partial marker (``</thi``, ``<tool_ca``) as text, and concatenating its
deltas gives exactly the one-shot result whatever the chunking.  Whitespace rules (applied the
same way in both forms): reasoning is stripped and leading whitespace of the answer dropped; the
whitespace before a tool call is dropped, and the whitespace after one is kept only if more text
follows it (so text on both sides of a call stays separated).
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import secrets
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ReasoningDelta",
    "ReasoningStreamParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamParser",
    "ToolStreamDelta",
    "convert_parameter",
    "new_tool_call_id",
    "parse_tool_calls",
    "split_reasoning",
]

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"

# A tool call opening inside the reasoning: the tag followed by a function header.
_IMPLICIT_REASONING_END = re.compile(r"<tool_call>\s*<function=")


def _could_become(tail: str, marker: str) -> bool:
    """True if ``tail`` is a proper prefix of ``marker`` (more text could complete it)."""
    return len(tail) < len(marker) and marker.startswith(tail)


# =============================================================================================
# reasoning


def split_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """One-shot split of generated text into ``(reasoning, content)``.

    ``thinking`` says whether the prompt left a ``<think>`` block open (the template's default);
    with ``thinking=False`` everything is content.  Reasoning that never ended (generation cut
    off while thinking) is returned as reasoning with empty content.
    """
    if not thinking:
        return "", text.lstrip()
    body = text
    if body.lstrip().startswith(THINK_START):  # tolerate a model that re-opens the block
        body = body.lstrip()[len(THINK_START):]
    end = body.find(THINK_END)
    implicit = _IMPLICIT_REASONING_END.search(body)
    if end >= 0 and (implicit is None or end < implicit.start()):
        reasoning, content = body[:end], body[end + len(THINK_END):]
    elif implicit is not None:
        reasoning, content = body[:implicit.start()], body[implicit.start():]
    else:
        reasoning, content = body, ""
    return reasoning.strip(), content.lstrip()


@dataclass
class ReasoningDelta:
    """What one ``feed`` produced: new reasoning text and new answer text (either may be empty)."""

    reasoning: str = ""
    content: str = ""


class ReasoningStreamParser:
    """Streaming counterpart of :func:`split_reasoning`; feed it decoded text deltas.

    Text that might be the start of ``</think>`` (or of a tool call that ends the reasoning) is
    held back until the next delta decides it; whitespace at the edges of the reasoning is held
    back too, so that the concatenated output equals the one-shot split exactly.
    """

    def __init__(self, thinking: bool = True) -> None:
        self._mode = "start" if thinking else "content"
        self._buf = ""  # text not yet assigned to reasoning or content
        self._reasoning_ws = ""  # whitespace that may turn out to be trailing (then dropped)
        self._reasoning_started = False
        self._content_started = False

    @property
    def in_reasoning(self) -> bool:
        """Still inside the thinking block (a budget enforcer would force ``</think>`` now)."""
        return self._mode in ("start", "reasoning")

    def feed(self, delta: str) -> ReasoningDelta:
        self._buf += delta
        out = ReasoningDelta()
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf = head[len(THINK_START):]
                elif not head or _could_become(head, THINK_START):
                    break  # cannot tell yet whether the model re-opened <think>
                self._mode = "reasoning"
            elif self._mode == "reasoning":
                end = self._buf.find(THINK_END)
                implicit = _IMPLICIT_REASONING_END.search(self._buf)
                if end >= 0 and (implicit is None or end < implicit.start()):
                    self._emit_reasoning(self._buf[:end], out)
                    self._buf = self._buf[end + len(THINK_END):]
                elif implicit is not None:
                    self._emit_reasoning(self._buf[:implicit.start()], out)
                    self._buf = self._buf[implicit.start():]  # the call itself is content
                else:
                    hold = self._undecided_start(self._buf)
                    self._emit_reasoning(self._buf[:hold], out)
                    self._buf = self._buf[hold:]
                    break
                self._mode = "content"
                self._reasoning_ws = ""
            else:
                text, self._buf = self._buf, ""
                if not self._content_started:
                    text = text.lstrip()
                    self._content_started = bool(text)
                out.content += text
                break
        return out

    def finish(self) -> ReasoningDelta:
        """End of generation: whatever was held back is resolved as plain text."""
        out = ReasoningDelta()
        if self._mode in ("start", "reasoning"):
            self._emit_reasoning(self._buf, out)
            self._buf = ""
            self._reasoning_ws = ""  # trailing whitespace of the reasoning is dropped
        return out

    def _emit_reasoning(self, text: str, out: ReasoningDelta) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_started = True
        text = self._reasoning_ws + text
        core = text.rstrip()
        self._reasoning_ws = text[len(core):]
        out.reasoning += core

    @staticmethod
    def _undecided_start(buf: str) -> int:
        """Index where a possibly incomplete end-of-reasoning marker begins (len(buf) if none)."""
        for i, ch in enumerate(buf):
            if ch != "<":
                continue
            tail = buf[i:]
            if _could_become(tail, THINK_END) or _could_become(tail, TOOL_CALL_START):
                return i
            if tail.startswith(TOOL_CALL_START):
                rest = tail[len(TOOL_CALL_START):].lstrip()
                if _could_become(rest, FUNCTION_START) or not rest:
                    return i
        return len(buf)


# =============================================================================================
# tool-call values


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool-call id."""
    return "call_" + secrets.token_hex(12)


def _schema_types(schema: Any, resolve: Callable[[Any], Any] | None = None) -> set[str]:
    """JSON types a schema admits (empty set: unknown, no constraint we can use).  ``resolve`` follows ``$ref``s
    (the grammar builder passes one; tool schemas parsed here are taken as they are)."""
    if resolve is not None:
        schema = resolve(schema)
    if not isinstance(schema, Mapping):
        return set()
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for option in options:
                types |= _schema_types(option, resolve)
    if not types:
        examples = list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else [])
        types.update(_json_type(v) for v in examples)
        if "properties" in schema:
            types.add("object")
        if "items" in schema:
            types.add("array")
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # NaN / Infinity cannot be sent on as JSON


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _fit(value: Any, types: set[str]) -> tuple[bool, Any]:
    """Does a parsed value satisfy one of the non-string types?  Returns (ok, value to use)."""
    kind = _json_type(value)
    if kind == "string":
        return False, value
    if kind in types:
        if kind == "number" and not math.isfinite(value):
            return False, value
        return True, value
    if kind == "integer" and "number" in types:
        return True, value
    if kind == "number" and "integer" in types and math.isfinite(value) and float(value).is_integer():
        return True, int(value)
    return False, value


def convert_parameter(raw: str, schema: Mapping[str, Any] | None) -> Any:
    """Turn the text of one ``<parameter>`` into a JSON value according to its schema.

    * a parameter that can only be a string (or null) keeps its text verbatim;
    * typed parameters (integer, number, boolean, object, array, null, unions) are parsed as
      JSON, then leniently (``True``/``False``/``None`` as rendered by the chat template for
      past calls, Python-literal dicts and lists, integers with leading zeros);
    * a value that does not fit its type, or a parameter without a schema, is JSON if it
      parses and text otherwise.  Nothing here raises.
    """
    types = _schema_types(schema)
    stripped = raw.strip()
    if types and types <= {"string", "null"}:
        if "null" in types and stripped in ("null", "None"):
            return None
        return raw
    try:
        parsed = _loads(stripped)
        parsed_ok = True
    except ValueError:
        parsed, parsed_ok = None, False
    if not types:
        return parsed if parsed_ok else raw
    if parsed_ok:
        ok, value = _fit(parsed, types)
        if ok:
            return value
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if "null" in types and stripped in ("None", "null"):
        return None
    if "string" in types:
        return raw  # the text is a valid value as it is
    if "integer" in types and re.fullmatch(r"[+-]?\d+", stripped):
        return int(stripped)
    if types & {"object", "array"}:
        literal = _python_literal(stripped)
        if isinstance(literal, (dict, list)) and _json_type(literal) in types:
            return literal
    return parsed if parsed_ok else raw


_JSON_CONSTANTS = {"true": "True", "false": "False", "null": "None"}


def _python_literal(text: str) -> Any:
    """A dict or list written as a Python literal (``{'a': 1, 'b': True}``), also with JSON's constants mixed in
    (``{'a': true}``, which models write too); None if it is not one or holds anything but plain JSON data."""
    if not text or text[0] not in "[{" or len(text) > 1_000_000:
        return None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        # true/false/null as bare names (never inside strings: those are STRING tokens) become Python's
        source = tokenize.untokenize((t.type, _JSON_CONSTANTS.get(t.string, t.string) if t.type == tokenize.NAME
                                      else t.string) for t in tokens)
        literal = ast.literal_eval(source)
        return _loads(json.dumps(literal, allow_nan=False))  # only plain JSON data (no sets, tuples as lists)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, tokenize.TokenError):
        return None


def _parameter_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """Function name -> {parameter name -> schema}; None when no tool list was given."""
    if tools is None:
        return None
    table: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        table[function["name"]] = dict(properties) if isinstance(properties, Mapping) else {}
    return table


# =============================================================================================
# tool calls


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; ``arguments`` is the JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call (OpenAI ``delta.tool_calls[i]``).

    The first piece of a call carries ``id`` and ``name``; later pieces carry only ``arguments``
    fragments.  Concatenating a call's fragments gives its :attr:`ToolCall.arguments`.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class ToolStreamDelta:
    """What one ``feed`` produced: answer text and tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


_PARAMETER_HEADER = re.compile(r"<parameter=([^>\n]*)>")
_FUNCTION_HEADER = re.compile(r"<function=([^>\n]*)>")

# Verdicts on a possible end of a parameter value (see ToolCallStreamParser._value_end).
_CLOSE, _WAIT, _NO, _FALLBACK = "close", "wait", "no", "fallback"
_VALUE_MARKERS = (PARAMETER_END, FUNCTION_END, TOOL_CALL_END)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


_TAG_DEPTH = {TOOL_CALL_START: ("call", 1), TOOL_CALL_END: ("call", -1), FUNCTION_START: ("function", 1),
              FUNCTION_END: ("function", -1), PARAMETER_START: ("parameter", 1), PARAMETER_END: ("parameter", -1)}
_TAGS = re.compile("|".join(re.escape(t) for t in _TAG_DEPTH))


_LONGEST_TAG = max(map(len, _TAG_DEPTH))


class _PossibleEnd:
    """A possible end of a value (closing tags followed by other text), with the tag depths of the text after it.

    That text must never close more tags than it opens for this to be the real end (prose or more calls
    follow, not the rest of a value that quoted a call).  The depths are counted incrementally, so a long
    held value is scanned once."""

    def __init__(self, pos: int, after: int) -> None:
        self.pos = pos  # where the closing tags start
        self.scanned = after  # text after the closing tags is counted up to here
        self.depth = {"call": 0, "function": 0, "parameter": 0}
        self.ok = True

    def shift(self, n: int) -> None:
        self.pos -= n
        self.scanned -= n

    def advance(self, buf: str, stop: int) -> None:
        """Count the tags of ``buf[scanned:stop]`` (only tags wholly inside it)."""
        if not self.ok or stop <= self.scanned:
            return
        last = self.scanned
        for match in _TAGS.finditer(buf, self.scanned, stop):
            kind, step = _TAG_DEPTH[match.group()]
            self.depth[kind] += step
            last = match.end()
            if self.depth[kind] < 0:
                self.ok = False
                return
        # a tag may straddle ``stop``: leave its possible start to the next count
        self.scanned = max(last, stop - _LONGEST_TAG + 1, self.scanned)

    def holds_until(self, buf: str, stop: int) -> bool:
        """Is this the real end, given the text up to ``stop``?  (Does not move the count.)"""
        probe = _PossibleEnd(self.pos, self.scanned)
        probe.depth, probe.ok = dict(self.depth), self.ok
        probe.advance(buf, stop)  # every tag wholly before ``stop`` is counted: the text is final up to there
        return probe.ok


def _json_fragment(text: str) -> str:
    """``text`` escaped as the inside of a JSON string; fragments concatenate to the escaped whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class ToolCallStreamParser:
    """Incremental Qwen XML tool-call parser; :func:`parse_tool_calls` runs it in one go.

    ``tools`` are the request's OpenAI tool definitions: they decide which function names count
    as calls, which parameter names exist and how values are typed.  ``tools=None`` accepts any
    function and parameter name and types values by trying JSON.

    **Where a value ends.**  Values are raw text and may themselves contain the format's tags (a
    coding agent writing a file about tool calls, a test fixture quoting one), so a tag ends a value
    only when what follows it is structure, not more value:

    * ``</parameter>`` followed by the header of a parameter of this function's schema that has not
      been given yet (any new name when the schema lists none) -- the next parameter;
    * ``</parameter>`` (optional) + ``</function>`` + ``</tool_call>`` (optional) followed by the
      end of the output, the next ``<tool_call>`` or the next ``<function=`` -- the end of the call;
    * ``</parameter>`` at the end of the output.

    Anything else -- a ``</parameter>`` followed by prose, a name outside the schema or one already
    given, a ``<parameter=`` header without the ``</parameter>`` before it, a nested ``<tool_call>``
    block -- is value text, so a call never gets a key twice.  Closing tags followed by other text
    are a *possible* end: the value ends at the first of them after which the output never closes
    more tags than it opens (prose or more calls follow, not the rest of a value that quoted a call),
    decided when a certain end arrives or the output ends.  Without any end the call was cut off: a
    string value keeps what was written (it has been streamed), a typed one is dropped.

    **Streaming.**  A call is announced (id and name) once its ``<function=NAME>`` header is
    complete.  A string-typed parameter is streamed as it arrives: ``"name": "`` and then escaped
    text fragments, held back only while a tag might be ending the value; other types are sent
    whole when their value ends (they are converted by the schema).  The fragments of a call
    concatenate to its :attr:`ToolCall.arguments` whatever the chunking.

    **Lenient forms.**  A call written without the ``<tool_call>`` wrapper (``<function=NAME>``
    of a known tool at the start of the answer or of a line, followed by a parameter or
    ``</function>``) is a call; a JSON body ``{"name": ..., "arguments": ...}`` between the tags is
    a call; an object or array parameter written as a Python literal is converted.  A
    ``<tool_call>`` block without a usable header (unknown function, garbage, cut off before the
    header) is returned as content: malformed output never becomes an error.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._schemas = _parameter_schemas(tools)
        self.calls: list[ToolCall] = []
        self._mode = "content"
        self._buf = ""
        self._out = ToolStreamDelta()
        # content whitespace handling (see module docstring)
        self._content_ws = ""  # trailing whitespace of the content so far, held back
        self._after_call = False  # a call just ended: whitespace that follows is held in _gap_ws
        self._gap_ws = ""
        self._ws_before_call = ""
        self._emitted_content = False
        # the call being parsed
        self._call_id = ""
        self._call_name = ""
        self._call_schemas: dict[str, Any] = {}
        self._call_args: list[str] = []
        self._given: set[str] = set()
        # the parameter value being parsed: ``_buf`` holds its undecided tail
        self._param_name = ""
        self._param_streams = False  # string-typed: sent as it arrives
        self._value_parts: list[str] = []  # decided value text (already sent when streaming)
        self._value_started = False  # the newline after the header has been dealt with
        self._scan = 0  # _buf[:_scan] holds no possible end of the value except those in _fallbacks
        self._fallbacks: list[_PossibleEnd] = []  # ends in _buf to take if the output brings no certain one
        # Scanned part of a long JSON body: kept as a list so that a body streamed token by token
        # is copied and searched once, not once per token.
        self._held: list[str] = []

    # ------------------------------------------------------------------ public

    @property
    def in_tool_call(self) -> bool:
        """Inside a tool call (a constrained decoder or stop logic may want to know)."""
        return self._mode != "content"

    def feed(self, delta: str) -> ToolStreamDelta:
        self._buf += delta
        self._run(final=False)
        return self._take()

    def finish(self) -> ToolStreamDelta:
        """End of generation: resolves held-back text and a call that was cut off."""
        while True:
            self._run(final=True)
            if self._mode in ("header", "json"):
                self._reject_call()  # the rest is text again and may hold another <tool_call>
            elif self._mode in ("function", "after_function"):
                self._buf = ""  # truncated call: keep the parameters completed so far
                self._close_call()
            else:
                break
        self._emit_content(self._buf)
        self._buf = ""
        self._out.content += self._content_ws
        self._content_ws = ""
        return self._take()

    # ------------------------------------------------------------------ state machine

    def _take(self) -> ToolStreamDelta:
        out, self._out = self._out, ToolStreamDelta()
        return out

    def _run(self, final: bool) -> None:
        # Modes: "content" -> (<tool_call>) "header" -> (<function=NAME>) "function", which
        # alternates with "parameter" for each <parameter=ARG> ... </parameter>, then
        # "after_function" -> (</tool_call>) "content"; "json" handles a JSON body instead.  A
        # call without the wrapper goes from "content" straight to "function".  Each step
        # consumes what it can from the buffer and returns True to go on (possibly in another
        # mode) or False to wait for more text; ``final`` marks the end of the output.
        step = {
            "content": self._step_content,
            "header": self._step_header,
            "json": self._step_json,
            "function": self._step_function,
            "parameter": self._step_parameter,
            "after_function": self._step_after_function,
        }
        while step[self._mode](final):
            pass

    def _step_content(self, final: bool) -> bool:
        buf = self._buf
        i = 0
        while True:
            i = buf.find("<", i)
            if i < 0:
                break
            tail = buf[i:]
            if tail.startswith(TOOL_CALL_START):
                self._emit_content(buf[:i])
                self._ws_before_call, self._content_ws = self._content_ws, ""
                self._buf = buf[i + len(TOOL_CALL_START):]
                self._mode = "header"
                return True
            bare = self._bare_call_at(buf, i, final)
            if bare is _WAIT or (not final and _could_become(tail, TOOL_CALL_START)):
                break  # hold from here: the next delta decides
            if bare is not None:
                match, end = bare
                self._emit_content(buf[:i])
                self._ws_before_call, self._content_ws = self._content_ws, ""
                self._start_call(match)
                self._buf = buf[end:]
                self._mode = "function"
                return True
            i += 1
        if final:
            return False  # finish() flushes the rest
        hold = len(buf) if i < 0 else i
        self._emit_content(buf[:hold])
        self._buf = buf[hold:]
        return False

    def _bare_call_at(self, buf: str, i: int, final: bool) -> Any:
        """A ``<function=NAME>`` call without the wrapper at ``i``: (name, end of header), _WAIT, or None."""
        if self._schemas is None:
            return None  # without a tool list a bare header is too easily prose
        tail = buf[i:]
        if not tail.startswith(FUNCTION_START):
            return _WAIT if not final and _could_become(tail, FUNCTION_START) else None
        line_start = buf.rfind("\n", 0, i) + 1
        if buf[line_start:i].strip():
            return None  # only at the start of a line
        if line_start == 0 and self._emitted_content and not self._after_call \
                and "\n" not in self._content_ws + buf[:i]:
            return None  # the line began in content already sent
        match = _FUNCTION_HEADER.match(buf, i)
        if match is None:
            return _WAIT if not final and not re.search(r"[>\n]", tail) else None
        name = match.group(1).strip()
        if not self._known(name):
            return None
        after = _skip_ws(buf, match.end())
        rest = buf[after:]
        if rest.startswith(PARAMETER_START) or rest.startswith(FUNCTION_END):
            return name, match.end()
        if not final and (not rest or _could_become(rest, PARAMETER_START) or _could_become(rest, FUNCTION_END)):
            return _WAIT
        return None

    def _step_header(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith("{"):
            self._mode = "json"
            return True
        if not head or _could_become(head, FUNCTION_START):
            return False  # wait for more text (finish() rejects it)
        match = _FUNCTION_HEADER.match(head)
        if match is None:
            if head.startswith(FUNCTION_START) and not re.search(r"[>\n]", head):
                return False  # header still being written
            return self._reject_call()
        name = match.group(1).strip()
        if not self._known(name):
            return self._reject_call()
        self._start_call(name)
        self._buf = head[match.end():]
        self._mode = "function"
        return True

    def _step_json(self, final: bool) -> bool:
        end = self._buf.find(TOOL_CALL_END)
        if end < 0:
            self._hold_scanned((TOOL_CALL_END,))
            return False
        self._buf = self._release_held()
        end = self._buf.find(TOOL_CALL_END)
        try:
            body = _loads(self._buf[:end])
        except ValueError:
            return self._reject_call()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not self._known(body["name"]):
            return self._reject_call()
        arguments = body.get("arguments", body.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = _loads(arguments)
            except ValueError:
                return self._reject_call()
        if not isinstance(arguments, dict):
            return self._reject_call()
        self._start_call(body["name"])
        text = json.dumps(arguments, ensure_ascii=False)
        self._call_args.append(text)
        self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), arguments=text))
        self._buf = self._buf[end + len(TOOL_CALL_END):]
        self._finish_call(closing="")
        return True

    def _step_function(self, final: bool) -> bool:
        markers = (PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
        found = self._earliest(self._buf, markers)
        if found is None:
            # Text between parameters carries nothing; keep only a possible partial marker.
            self._buf = self._buf[self._partial_start(self._buf, markers):]
            return False
        pos, marker = found
        if marker == PARAMETER_START:
            match = _PARAMETER_HEADER.match(self._buf, pos)
            if match is None:
                if not re.search(r"[>\n]", self._buf[pos:]):
                    self._buf = self._buf[pos:]
                    return False  # header still being written
                self._buf = self._buf[pos + len(PARAMETER_START):]  # not a header: skip it
                return True
            name = match.group(1).strip()
            self._buf = self._buf[match.end():]
            if name in self._given:  # only possible for a malformed first parameter; never a second key
                self._mode = "function"
                return True
            self._start_parameter(name)
        elif marker == FUNCTION_END:
            self._buf = self._buf[pos + len(FUNCTION_END):]
            self._mode = "after_function"
        else:
            self._buf = self._buf[pos + len(TOOL_CALL_END):]
            self._close_call()
        return True

    def _step_parameter(self, final: bool) -> bool:
        buf = self._buf
        if not self._value_started:
            if not buf and not final:
                return False
            if buf.startswith("\n"):  # the format puts the value on its own lines
                buf = self._buf = buf[1:]
            self._value_started = True
        i = self._scan
        hold = len(buf)
        while True:
            i = buf.find("<", i)
            if i < 0:
                break
            verdict = self._value_end(buf, i, final)
            if verdict is _CLOSE:
                self._end_value(self._first_real_end(buf, i, final))
                return True
            if verdict is _WAIT:
                hold = i
                break
            if verdict is _FALLBACK:
                self._fallbacks.append(_PossibleEnd(i, self._closing_tags_end(buf, i)))
            i += 1
        if final:
            end = self._first_real_end(buf, None, final)
            if end is not None:
                self._end_value(end)
            elif self._param_streams:
                self._end_value(len(buf))  # cut off: keep what was written (it has been sent)
            else:
                self._reset_value()  # cut off: a partial typed value is dropped
                self._buf = ""
                self._mode = "function"
            return True
        # Everything before the first undecided end is value text; a fallback end keeps the rest
        # held, since the value may yet turn out to end there.
        for end in self._fallbacks:
            end.advance(buf, len(buf))
        self._fallbacks = [end for end in self._fallbacks if end.ok]  # quoted closes: value text after all
        settled = self._fallbacks[0].pos if self._fallbacks else hold
        if settled and buf[settled - 1] == "\n":
            settled -= 1  # may be the newline before the closing tag, which is not part of the value
        if settled:
            self._add_value_text(buf[:settled])
            self._buf = buf[settled:]
            for end in self._fallbacks:
                end.shift(settled)
        self._scan = hold - settled
        return False

    def _step_after_function(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(TOOL_CALL_END):
            self._buf = head[len(TOOL_CALL_END):]
        elif not final and (not head or _could_become(head, TOOL_CALL_END)):
            return False
        # else: no wrapper (or none closed it): the call ends here and the rest is content
        self._close_call()
        return True

    # ------------------------------------------------------------------ values

    def _first_real_end(self, buf: str, certain: int | None, final: bool) -> int | None:
        """The end of the value: the first possible end whose following text (up to and including the closing
        tags at ``certain``, or to the end of the output) never closes more than it opens; else ``certain``."""
        stop = len(buf) if certain is None else self._closing_tags_end(buf, certain)
        for end in self._fallbacks:
            if end.holds_until(buf, stop):
                return end.pos
        return certain

    @staticmethod
    def _closing_tags_end(buf: str, i: int) -> int:
        """Where the run of closing tags (</parameter>, </function>, </tool_call>, whitespace) at ``i`` ends."""
        while True:
            j = _skip_ws(buf, i)
            for tag in _VALUE_MARKERS:
                if buf.startswith(tag, j):
                    i = j + len(tag)
                    break
            else:
                return i

    def _value_end(self, buf: str, i: int, final: bool) -> str:
        """Is the '<' at ``buf[i]`` the end of the current value?  _CLOSE, _NO, _WAIT (more text
        decides) or _FALLBACK (not now, but the end to take if the output brings no better one)."""
        tail = buf[i:]
        if tail.startswith(PARAMETER_END):
            j = _skip_ws(buf, i + len(PARAMETER_END))
            rest = buf[j:]
            if not rest:
                return _CLOSE if final else _WAIT
            if rest.startswith(PARAMETER_START):
                match = _PARAMETER_HEADER.match(buf, j)
                if match is None:
                    return _WAIT if not final and not re.search(r"[>\n]", rest) else _NO
                return _CLOSE if self._may_follow(match.group(1).strip()) else _NO
            if not final and _could_become(rest, PARAMETER_START):
                return _WAIT
            return self._call_end(buf, j, final)
        if tail.startswith((FUNCTION_END, TOOL_CALL_END)):
            return self._call_end(buf, i, final)  # closing tags without </parameter>
        if not final and any(_could_become(tail, m) for m in _VALUE_MARKERS):
            return _WAIT
        return _NO

    def _call_end(self, buf: str, i: int, final: bool) -> str:
        """Verdict for ``</function>`` / ``</tool_call>`` at ``i`` (after a ``</parameter>``)."""
        tail = buf[i:]
        if tail.startswith(FUNCTION_END):
            j = _skip_ws(buf, i + len(FUNCTION_END))
            rest = buf[j:]
            if rest.startswith(TOOL_CALL_END):
                return self._after_call_end(buf, j + len(TOOL_CALL_END), final)
            if not final and (not rest or _could_become(rest, TOOL_CALL_END)):
                return _WAIT
            return self._after_call_end(buf, j, final)  # the bare form has no </tool_call>
        if tail.startswith(TOOL_CALL_END):
            return self._after_call_end(buf, i + len(TOOL_CALL_END), final)
        if not final and (_could_become(tail, FUNCTION_END) or _could_become(tail, TOOL_CALL_END)):
            return _WAIT
        return _NO

    @staticmethod
    def _after_call_end(buf: str, i: int, final: bool) -> str:
        """A call's closing tags end at ``i``: real if the output ends or another call follows."""
        j = _skip_ws(buf, i)
        rest = buf[j:]
        if not rest:
            return _CLOSE if final else _WAIT
        if rest.startswith((TOOL_CALL_START, FUNCTION_START)):
            return _CLOSE
        if rest.startswith(_VALUE_MARKERS):
            return _NO  # more closing tags: these were quoted inside the value
        if not final and any(_could_become(rest, m) for m in (TOOL_CALL_START, FUNCTION_START) + _VALUE_MARKERS):
            return _WAIT
        return _FALLBACK

    def _may_follow(self, name: str) -> bool:
        """Can ``<parameter=name>`` start the next parameter of the current call?"""
        if not name or name == self._param_name or name in self._given:
            return False
        return not self._call_schemas or name in self._call_schemas

    def _start_parameter(self, name: str) -> None:
        self._param_name = name
        self._mode = "parameter"
        self._reset_value()
        types = _schema_types(self._call_schemas.get(name))
        self._param_streams = bool(types) and types <= {"string"}
        if self._param_streams:
            self._emit_args(self._key(name) + '"')

    def _reset_value(self) -> None:
        self._value_parts = []
        self._value_started = False
        self._scan = 0
        self._fallbacks = []

    def _add_value_text(self, text: str) -> None:
        self._value_parts.append(text)
        if self._param_streams and text:
            self._emit_args(_json_fragment(text))

    def _end_value(self, end: int) -> None:
        """The value ends at ``_buf[end]``; record it and go back to the function body."""
        raw = self._buf[:end]
        if raw.endswith("\n") and end < len(self._buf):
            raw = raw[:-1]  # the newline before the closing tag
        rest = self._buf[end:]
        if rest.startswith(PARAMETER_END):
            rest = rest[len(PARAMETER_END):]
        name = self._param_name
        if self._param_streams:
            self._add_value_text(raw)
            self._emit_args('"')
        else:
            value = convert_parameter("".join(self._value_parts) + raw, self._call_schemas.get(name))
            self._emit_args(self._key(name) + json.dumps(value, ensure_ascii=False))
        self._given.add(name)
        self._reset_value()
        self._buf = rest
        self._mode = "function"

    def _key(self, name: str) -> str:
        opening = "{" if not self._call_args else ", "
        return opening + json.dumps(name, ensure_ascii=False) + ": "

    def _emit_args(self, piece: str) -> None:
        self._call_args.append(piece)
        self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), arguments=piece))

    # ------------------------------------------------------------------ helpers

    def _known(self, name: str) -> bool:
        return bool(name) and (self._schemas is None or name in self._schemas)

    def _start_call(self, name: str) -> None:
        self._call_id = new_tool_call_id()
        self._call_name = name
        self._call_schemas = (self._schemas or {}).get(name, {})
        self._call_args = []
        self._given = set()
        self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), id=self._call_id, name=name))

    def _close_call(self) -> None:
        self._finish_call(closing="}" if self._call_args else "{}")

    def _finish_call(self, closing: str) -> None:
        if closing:
            self._call_args.append(closing)
            self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), arguments=closing))
        self.calls.append(ToolCall(self._call_id, self._call_name, "".join(self._call_args)))
        self._mode = "content"
        self._after_call = True
        self._gap_ws = ""
        self._ws_before_call = ""

    def _reject_call(self) -> bool:
        """Not a usable call: the tag and everything after it are ordinary text again."""
        self._emit_content(self._ws_before_call + TOOL_CALL_START)
        self._ws_before_call = ""
        self._buf = self._release_held()
        self._mode = "content"
        return True

    def _emit_content(self, text: str) -> None:
        if self._after_call:
            # Whitespace after a call only matters if text follows it; it then separates that
            # text from the content before the call (and is dropped at the start of the answer).
            stripped = text.lstrip()
            if not stripped:
                self._gap_ws += text
                return
            gap = self._gap_ws + text[:len(text) - len(stripped)]
            text = (gap if self._emitted_content else "") + stripped
            self._gap_ws = ""
            self._after_call = False
        text = self._content_ws + text
        core = text.rstrip()
        self._content_ws = text[len(core):]
        if core:
            self._out.content += core
            self._emitted_content = True

    def _hold_scanned(self, markers: tuple[str, ...]) -> None:
        """Move the scanned part of the buffer (all but a possible partial marker) to _held."""
        keep = max(0, len(self._buf) - max(map(len, markers)) + 1)
        if keep:
            self._held.append(self._buf[:keep])
            self._buf = self._buf[keep:]

    def _release_held(self) -> str:
        text = "".join(self._held) + self._buf
        self._held = []
        return text

    @staticmethod
    def _earliest(buf: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for marker in markers:
            pos = buf.find(marker)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, marker)
        return best

    @staticmethod
    def _partial_start(buf: str, markers: tuple[str, ...]) -> int:
        longest = max(len(m) for m in markers)
        for i in range(max(0, len(buf) - longest + 1), len(buf)):
            if any(_could_become(buf[i:], m) for m in markers):
                return i
        return len(buf)


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, list[ToolCall]]:
    """One-shot parse of an answer: ``(content without the calls, calls in order)``."""
    parser = ToolCallStreamParser(tools)
    content = parser.feed(text).content + parser.finish().content
    return content, list(parser.calls)
