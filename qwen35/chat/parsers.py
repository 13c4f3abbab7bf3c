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
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
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


def _schema_types(schema: Any) -> set[str]:
    """JSON types a schema admits (empty set: unknown, no constraint we can use)."""
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
                types |= _schema_types(option)
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
        try:
            literal = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            literal = None
        if isinstance(literal, (dict, list)):
            try:
                return _loads(json.dumps(literal))  # only keep it if it is plain JSON data
            except (TypeError, ValueError):
                pass
    return parsed if parsed_ok else raw


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


class ToolCallStreamParser:
    """Incremental Qwen XML tool-call parser; :func:`parse_tool_calls` runs it in one go.

    ``tools`` are the request's OpenAI tool definitions: they decide which function names count
    as calls and how parameter values are typed.  ``tools=None`` accepts any function name and
    types values by trying JSON.

    A call is announced (id and name) as soon as its ``<function=NAME>`` header is complete, and
    each parameter is sent as an argument fragment when its ``</parameter>`` arrives.  Output cut
    off inside a call (``max_tokens``) still yields that call with the parameters completed so
    far.  A ``<tool_call>`` block without a usable header (unknown function, garbage, cut off
    before the header) is returned as content.  A JSON body ``{"name": ..., "arguments": ...}``
    between the tags, which some deployments see instead of XML, is accepted as a call too.
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
        self._param_name = ""
        # Scanned part of a long held value (parameter or JSON body): kept as a list so that a
        # value streamed token by token is copied and searched once, not once per token.
        self._held: list[str] = []

    # ------------------------------------------------------------------ public

    @property
    def in_tool_call(self) -> bool:
        """Inside a ``<tool_call>`` block (a constrained decoder or stop logic may want to know)."""
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
            elif self._mode in ("function", "parameter", "after_function"):
                self._buf, self._held = "", []  # truncated call: keep complete parameters, drop a partial value
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
        # "after_function" -> (</tool_call>) "content"; "json" handles a JSON body instead.
        # Each step consumes what it can from the buffer and returns True to go on (possibly in
        # another mode) or False to wait for more text; ``final`` marks the end of the output.
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
        start = self._buf.find(TOOL_CALL_START)
        if start < 0:
            # Hold back a trailing '<tool_ca...' that the next delta may complete.
            hold = len(self._buf)
            for i in range(max(0, len(self._buf) - len(TOOL_CALL_START) + 1), len(self._buf)):
                if _could_become(self._buf[i:], TOOL_CALL_START):
                    hold = i
                    break
            if final:
                return False  # finish() flushes the rest
            self._emit_content(self._buf[:hold])
            self._buf = self._buf[hold:]
            return False
        self._emit_content(self._buf[:start])
        self._ws_before_call, self._content_ws = self._content_ws, ""
        self._buf = self._buf[start + len(TOOL_CALL_START):]
        self._mode = "header"
        return True

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
        found = self._earliest(self._buf, (PARAMETER_START, FUNCTION_END, TOOL_CALL_END))
        if found is None:
            # Text between parameters carries nothing; keep only a possible partial marker.
            self._buf = self._buf[self._partial_start(self._buf, (PARAMETER_START, FUNCTION_END, TOOL_CALL_END)):]
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
            self._param_name = match.group(1).strip()
            self._buf = self._buf[match.end():]
            self._mode = "parameter"
        elif marker == FUNCTION_END:
            self._buf = self._buf[pos + len(FUNCTION_END):]
            self._mode = "after_function"
        else:
            self._buf = self._buf[pos + len(TOOL_CALL_END):]
            self._close_call()
        return True

    def _step_parameter(self, final: bool) -> bool:
        # The value ends at </parameter>; a missing closing tag is tolerated when the next
        # parameter, the end of the function or the end of the call follows.
        markers = (PARAMETER_END, PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
        found = self._earliest(self._buf, markers)
        if found is None:
            self._hold_scanned(markers)
            return False
        pos, marker = found
        self._add_parameter(self._param_name, "".join(self._held) + self._buf[:pos])
        self._held = []
        self._buf = self._buf[pos + len(PARAMETER_END):] if marker == PARAMETER_END else self._buf[pos:]
        self._mode = "function"
        return True

    def _step_after_function(self, final: bool) -> bool:
        end = self._buf.find(TOOL_CALL_END)
        if end < 0:
            self._buf = self._buf[self._partial_start(self._buf, (TOOL_CALL_END,)):]
            return False
        self._buf = self._buf[end + len(TOOL_CALL_END):]
        self._close_call()
        return True

    # ------------------------------------------------------------------ helpers

    def _known(self, name: str) -> bool:
        return bool(name) and (self._schemas is None or name in self._schemas)

    def _start_call(self, name: str) -> None:
        self._call_id = new_tool_call_id()
        self._call_name = name
        self._call_schemas = (self._schemas or {}).get(name, {})
        self._call_args = []
        self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), id=self._call_id, name=name))

    def _add_parameter(self, name: str, raw: str) -> None:
        # The format puts the value on its own lines: drop exactly one newline on each side.
        if raw.startswith("\n"):
            raw = raw[1:]
        if raw.endswith("\n"):
            raw = raw[:-1]
        value = convert_parameter(raw, self._call_schemas.get(name))
        piece = ("{" if not self._call_args else ", ") + json.dumps(name, ensure_ascii=False) + ": " \
            + json.dumps(value, ensure_ascii=False)
        self._call_args.append(piece)
        self._out.tool_calls.append(ToolCallDelta(index=len(self.calls), arguments=piece))

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
