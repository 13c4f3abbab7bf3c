"""What the agent loop calls: a :class:`Tool` is a name, a description, a JSON schema for its arguments and a
function that takes the arguments (a dict) and returns the text the model reads as the tool's answer.

Errors have two kinds, because they end differently:

* anything a tool raises while running a call (a :class:`ToolError`, or any other ``Exception``) is *the call's*
  failure: the loop feeds ``error: ...`` back to the model, which may try again or answer without it;
* a :class:`ToolUnavailableError` means the tool itself is gone (an MCP server that crashed): the loop stops and
  the error reaches the caller, since retrying against a dead tool only wastes rounds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tool", "ToolError", "ToolUnavailableError", "check_arguments", "format_call"]


class ToolError(Exception):
    """A call failed in a way the model should hear about (the message becomes the tool result)."""


class ToolUnavailableError(RuntimeError):
    """The tool cannot run any call any more (its server died, say): the agent loop stops with this error."""


@dataclass
class Tool:
    """One tool offered to the model.

    ``parameters`` is the JSON schema of the arguments object (``{"type": "object", "properties": ...}``);
    ``function(arguments: dict)`` runs a call and returns its result: a ``str`` is passed on as it is, anything
    else is sent as JSON.  ``source`` says where the tool comes from (shown by the chat REPL's ``/tools``).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[[dict[str, Any]], Any]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # free for the tool's owner (e.g. the MCP server)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a tool needs a non-empty name, got {self.name!r}")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type", "object") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")

    @property
    def definition(self) -> dict[str, Any]:
        """The OpenAI-style definition passed to ``LLM.chat(tools=...)``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}

    def __call__(self, arguments: dict[str, Any]) -> str:
        out = self.function(arguments)
        if isinstance(out, str):
            return out
        return json.dumps(out, ensure_ascii=False, default=str)


# -- argument checking --------------------------------------------------------------------------------------------
# A small subset of JSON schema: what tool definitions actually use (type, properties, required, enum, items,
# additionalProperties, anyOf/oneOf).  Anything else is accepted unchecked: the tool itself has the last word, and
# a false rejection would hide a good call from it.

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and math.isfinite(v) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _where(path: str) -> str:
    return path or "the arguments"


def _check(schema: Any, value: Any, path: str, errors: list[str]) -> None:
    if not isinstance(schema, Mapping):
        return
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list) and options:
        for option in options:
            trial: list[str] = []
            _check(option, value, path, trial)
            if not trial:
                break
        else:
            errors.append(f"{_where(path)}: {json.dumps(value)} matches none of the allowed forms")
            return
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared) if isinstance(declared, list) else []
    known = [t for t in types if t in _TYPES]
    if known and not any(_TYPES[t](value) for t in known):
        errors.append(f"{_where(path)} must be {' or '.join(known)}, got {json.dumps(value)}")
        return
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        errors.append(f"{_where(path)} must be one of {allowed}, got {json.dumps(value)}")
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
        for name in schema.get("required") or ():
            if name not in value:
                errors.append(f"'{name}' is required" + (f" in {path}" if path else ""))
        for name, item in value.items():
            sub = f"{path}.{name}" if path else f"'{name}'"
            if name in properties:
                _check(properties[name], item, sub, errors)
            elif schema.get("additionalProperties") is False:
                known_names = ", ".join(properties) or "none"
                errors.append(f"{sub} is not a parameter (the parameters are: {known_names})")
            elif isinstance(schema.get("additionalProperties"), Mapping):
                _check(schema["additionalProperties"], item, sub, errors)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for k, item in enumerate(value):
            _check(schema["items"], item, f"{_where(path)}[{k}]", errors)


def check_arguments(schema: Mapping[str, Any], arguments: Any) -> list[str]:
    """What is wrong with ``arguments`` against the tool's parameter ``schema``: a list of messages, [] if fine."""
    if not isinstance(arguments, dict):
        return [f"the arguments must be a JSON object, got {json.dumps(arguments)}"]
    errors: list[str] = []
    _check(schema, arguments, "", errors)
    return errors


# -- showing calls ------------------------------------------------------------------------------------------------

def format_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    """A call as a person reads it: ``calculator(expression="2+2")`` on one line when the values are short,
    else the name followed by one indented block per argument (code stays readable, newlines and all)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return f"{name}({arguments})"  # not JSON: show what the model wrote
    else:
        parsed = dict(arguments)
    if not isinstance(parsed, dict):
        return f"{name}({json.dumps(parsed, ensure_ascii=False)})"
    shown = {k: json.dumps(v, ensure_ascii=False) for k, v in parsed.items()}
    multiline = any(isinstance(v, str) and "\n" in v for v in parsed.values())
    if not multiline and sum(len(k) + len(v) + 3 for k, v in shown.items()) <= 100:
        return f"{name}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
    lines = [name]
    for key, value in parsed.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2)
        lines.append(f"  {key}:")
        lines.extend("    " + line for line in text.splitlines() or [""])
    return "\n".join(lines)
