"""The agent loop: ask the model, run the tools it calls, feed the results back, until it answers.

    from qwen35 import LLM
    from qwen35.agent import MCPClient, PythonTool, run_agent

    llm = LLM()
    with MCPClient(["python my_server.py"]) as mcp:
        result = run_agent(llm, [{"role": "user", "content": "What is 123 * 45?"}], mcp.tools + [PythonTool()])
    print(result.content)

Each round is one ``llm.chat`` call with the tools' definitions.  The assistant message goes into the history,
then each of its tool calls is checked and run, and its result appended as ``{"role": "tool", "tool_call_id":
..., "content": ...}``.  A call the model got wrong -- a tool that does not exist, arguments that are not JSON or
do not fit the schema, a tool that raises -- is answered with an ``error: ...`` result, so the model can correct
itself; it never ends the loop.  ``confirm(call) -> bool`` is asked before every call (None: run them all); a
declined call gets a "the user declined" result.  The loop ends at an answer without calls, or after
``max_rounds`` model turns: the calls of that last turn are answered "not run" so that the history stays valid
(every call has its result) and can be continued.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tools import Tool, ToolUnavailableError, check_arguments

__all__ = ["DECLINED", "AgentEvent", "AgentResult", "run_agent"]

DECLINED = "the user declined this tool call; it was not run"


@dataclass
class AgentEvent:
    """Something the loop did, for ``on_event`` (a UI shows these as they happen).

    ``kind``: ``"response"`` (a model turn: ``response`` is its ChatResult), ``"tool_call"`` (about to be
    confirmed and run), ``"tool_result"`` (``text``; ``error`` when the call failed), ``"declined"``,
    ``"max_rounds"`` (the loop stops with calls unanswered).
    """

    kind: str
    round: int
    call: Any = None  # the ToolCall (id, name, arguments as JSON text)
    text: str = ""
    error: bool = False
    response: Any = None


@dataclass
class AgentResult:
    """``messages``: the whole conversation (the input plus every new assistant and tool message);
    ``response``: the last ChatResult; ``rounds``: model turns taken; ``stop``: "answer" or "max_rounds"."""

    messages: list[dict[str, Any]]
    response: Any
    rounds: int
    stop: str
    tool_results: list[AgentEvent] = field(default_factory=list)

    @property
    def content(self) -> str | None:
        return self.response.content if self.response is not None else None

    @property
    def reasoning(self) -> str | None:
        return self.response.reasoning if self.response is not None else None


def _run_call(call: Any, tools: Mapping[str, Tool]) -> tuple[str, bool]:
    """(result text, failed) for one call; only a ToolUnavailableError escapes."""
    tool = tools.get(call.name)
    if tool is None:
        names = ", ".join(tools) or "none"
        return f"error: there is no tool named {call.name!r} (the tools are: {names})", True
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError as e:
        return f"error: the arguments of {call.name} are not valid JSON ({e}): {call.arguments}", True
    problems = check_arguments(tool.parameters, arguments)
    if problems:
        return f"error: wrong arguments for {call.name}: " + "; ".join(problems), True
    try:
        return tool(arguments), False
    except ToolUnavailableError:
        raise
    except Exception as e:  # the tool's own failure is the model's to hear about, not the caller's crash
        return f"error: {e}" if str(e) else f"error: {type(e).__name__}", True


def run_agent(llm: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool] = (), *,
              confirm: Callable[[Any], bool] | None = None, max_rounds: int = 8,
              on_event: Callable[[AgentEvent], None] | None = None, params: Any = None,
              enable_thinking: bool | None = None, tool_choice: str | Mapping[str, Any] = "auto") -> AgentResult:
    """Run the conversation ``messages`` to an answer, calling ``tools`` as the model asks (see the module doc).

    ``llm`` is anything with :meth:`qwen35.LLM.chat`'s signature.  ``params`` and ``enable_thinking`` are passed
    to every ``llm.chat`` call; ``tool_choice`` to the first one only (a forced call must not repeat forever).
    The input list is not changed: the returned :class:`AgentResult` holds the continued history.
    """
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    by_name: dict[str, Tool] = {}
    for tool in tools:
        if not isinstance(tool, Tool):
            raise TypeError(f"tools must be qwen35.agent.Tool objects, got {type(tool).__name__}")
        if tool.name in by_name:
            raise ValueError(f"two tools are named {tool.name!r}")
        by_name[tool.name] = tool
    definitions = [t.definition for t in by_name.values()] or None
    history = [dict(m) for m in messages]
    emit = on_event or (lambda event: None)
    results: list[AgentEvent] = []
    response = None
    for round_ in range(1, max_rounds + 1):
        response = llm.chat(history, params, tools=definitions,
                            tool_choice=(tool_choice if round_ == 1 else "auto") if definitions else None,
                            enable_thinking=enable_thinking)
        emit(AgentEvent("response", round_, response=response))
        history.append(response.message)
        calls = list(response.tool_calls or ())
        if not calls:
            return AgentResult(history, response, round_, "answer", results)
        if round_ == max_rounds:
            emit(AgentEvent("max_rounds", round_))
            for call in calls:
                history.append({"role": "tool", "tool_call_id": call.id,
                                "content": f"not run: the limit of {max_rounds} rounds of tool calls was reached"})
            return AgentResult(history, response, round_, "max_rounds", results)
        for call in calls:
            emit(AgentEvent("tool_call", round_, call=call))
            if confirm is not None and not confirm(call):
                event = AgentEvent("declined", round_, call=call, text=DECLINED, error=True)
            else:
                text, failed = _run_call(call, by_name)
                event = AgentEvent("tool_result", round_, call=call, text=text, error=failed)
            emit(event)
            results.append(event)
            history.append({"role": "tool", "tool_call_id": call.id, "content": event.text})
    raise AssertionError("unreachable")  # pragma: no cover  (the last round always returns)
