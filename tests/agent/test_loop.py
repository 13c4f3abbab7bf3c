"""The agent loop with a scripted stand-in for the LLM (real ChatResult / ChatChoice / ToolCall objects):
message threading, confirmation, bad calls fed back as errors, max_rounds; then one run of the real embedded
model against the test MCP server's calculator."""

from __future__ import annotations

import copy
import json

import pytest

from qwen35.agent import DECLINED, Tool, ToolError, ToolUnavailableError, check_arguments, format_call, run_agent
from qwen35.chat.completion import ChatChoice, ChatResult
from qwen35.chat.parsers import ToolCall


def answer(content: str | None = None, *calls: ToolCall, reasoning: str | None = None) -> ChatResult:
    choice = ChatChoice(index=0, reasoning=reasoning, content=content, tool_calls=list(calls),
                        finish_reason="tool_calls" if calls else "stop")
    return ChatResult(request_id="scripted", prompt="", prompt_token_ids=[], choices=[choice])


def call(name: str, arguments, id: str | None = None) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=id or f"call_{name}", name=name, arguments=text)


class ScriptedLLM:
    """``chat`` returns the scripted answers in turn and records what it was asked."""

    def __init__(self, *turns: ChatResult) -> None:
        self.turns = list(turns)
        self.requests: list[dict] = []

    def chat(self, messages, params=None, tools=None, tool_choice="auto", enable_thinking=None):
        self.requests.append({"messages": copy.deepcopy(messages), "tools": tools, "tool_choice": tool_choice,
                              "params": params, "enable_thinking": enable_thinking})
        turn = self.turns.pop(0)
        return turn() if callable(turn) else turn


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, arguments: dict) -> str:
        self.calls.append(arguments)
        return str(arguments["a"] + arguments["b"])


ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}


def add_tool(recorder: Recorder | None = None) -> Tool:
    return Tool("add", "Add two whole numbers.", ADD_SCHEMA, recorder or Recorder())


def echo_tool() -> Tool:
    schema = {"type": "object", "properties": {"text": {"type": "string"},
                                               "mode": {"type": "string", "enum": ["plain", "loud"]}}}
    return Tool("echo", "Echo.", schema, lambda args: {"echo": args.get("text", "")})


USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3, and say hi"}]


def test_messages_are_threaded_through_the_rounds():
    recorder = Recorder()
    llm = ScriptedLLM(answer(None, call("add", {"a": 2, "b": 3}, "c1"), call("echo", {"text": "hi"}, "c2"),
                             reasoning="I need tools."),
                      answer("5, and hi"))
    events = []
    messages = copy.deepcopy(USER)
    result = run_agent(llm, messages, [add_tool(recorder), echo_tool()], on_event=events.append, params="P",
                       enable_thinking=False)
    assert messages == USER  # the input is not changed
    assert result.stop == "answer" and result.rounds == 2 and result.content == "5, and hi"
    assert recorder.calls == [{"a": 2, "b": 3}]
    assert result.messages == USER + [
        {"role": "assistant", "content": "", "reasoning_content": "I need tools.",
         "tool_calls": [call("add", {"a": 2, "b": 3}, "c1").to_openai(),
                        call("echo", {"text": "hi"}, "c2").to_openai()]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": '{"echo": "hi"}'},  # a non-string result as JSON
        {"role": "assistant", "content": "5, and hi"},
    ]
    # the second request saw the tool results; every request got the definitions and the caller's settings
    assert llm.requests[1]["messages"] == result.messages[:-1]
    assert [t["function"]["name"] for t in llm.requests[0]["tools"]] == ["add", "echo"]
    assert all(r["params"] == "P" and r["enable_thinking"] is False for r in llm.requests)
    assert [(e.kind, e.call.id if e.call else None) for e in events] == [
        ("response", None), ("tool_call", "c1"), ("tool_result", "c1"), ("tool_call", "c2"), ("tool_result", "c2"),
        ("response", None)]
    assert [e.text for e in result.tool_results] == ["5", '{"echo": "hi"}']


def test_no_tools_means_one_plain_turn():
    llm = ScriptedLLM(answer("Hello!"))
    result = run_agent(llm, [{"role": "user", "content": "Hi"}])
    assert result.content == "Hello!" and result.rounds == 1
    assert llm.requests[0]["tools"] is None and llm.requests[0]["tool_choice"] is None


def test_confirm_can_decline_a_call():
    recorder = Recorder()
    asked = []

    def confirm(c: ToolCall) -> bool:
        asked.append((c.name, json.loads(c.arguments)))
        return c.id != "c1"

    llm = ScriptedLLM(answer(None, call("add", {"a": 1, "b": 1}, "c1"), call("add", {"a": 2, "b": 2}, "c2")),
                      answer("done"))
    result = run_agent(llm, USER, [add_tool(recorder)], confirm=confirm)
    assert asked == [("add", {"a": 1, "b": 1}), ("add", {"a": 2, "b": 2})]
    assert recorder.calls == [{"a": 2, "b": 2}]  # only the accepted one ran
    tool_messages = [m for m in result.messages if m["role"] == "tool"]
    assert tool_messages == [{"role": "tool", "tool_call_id": "c1", "content": DECLINED},
                             {"role": "tool", "tool_call_id": "c2", "content": "4"}]
    assert "the user declined" in DECLINED


@pytest.mark.parametrize("bad_call, expected", [
    (call("add", '{"a": 1, "b": '), "error: the arguments of add are not valid JSON"),
    (call("add", "[1, 2]"), "the arguments must be a JSON object"),
    (call("add", {"a": 1}), "error: wrong arguments for add: 'b' is required"),
    (call("add", {"a": "one", "b": 2}), "'a' must be integer, got \"one\""),
    (call("add", {"a": 1, "b": 2, "c": 3}), "'c' is not a parameter (the parameters are: a, b)"),
    (call("echo", {"mode": "quiet"}), "'mode' must be one of \"plain\", \"loud\", got \"quiet\""),
    (call("multiply", {"a": 1, "b": 2}), "error: there is no tool named 'multiply' (the tools are: add, echo)"),
])
def test_bad_calls_are_fed_back_not_raised(bad_call, expected):
    recorder = Recorder()
    llm = ScriptedLLM(answer(None, bad_call), answer(None, call("add", {"a": 1, "b": 2}, "retry")), answer("3"))
    events = []
    result = run_agent(llm, USER, [add_tool(recorder), echo_tool()], on_event=events.append)
    first = next(e for e in events if e.kind == "tool_result")
    assert expected in first.text and first.text.startswith("error: ") and first.error
    assert result.messages[len(USER) + 1] == {"role": "tool", "tool_call_id": bad_call.id, "content": first.text}
    assert recorder.calls == [{"a": 1, "b": 2}]  # the bad call never reached the tool; the retry did
    assert result.content == "3" and result.stop == "answer"


def test_a_failing_tool_is_reported_to_the_model():
    def broken(arguments):
        raise ValueError("the database is locked")

    def refusing(arguments):
        raise ToolError("quota exceeded")

    llm = ScriptedLLM(answer(None, call("broken", {}, "c1"), call("refusing", {}, "c2")), answer("sorry"))
    schema = {"type": "object", "properties": {}}
    result = run_agent(llm, USER, [Tool("broken", "", schema, broken), Tool("refusing", "", schema, refusing)])
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == [
        "error: the database is locked", "error: quota exceeded"]


def test_an_unavailable_tool_stops_the_loop():
    def dead(arguments):
        raise ToolUnavailableError("MCP server 'x' stopped working")

    llm = ScriptedLLM(answer(None, call("dead", {})), answer("never asked"))
    with pytest.raises(ToolUnavailableError, match="stopped working"):
        run_agent(llm, USER, [Tool("dead", "", {"type": "object", "properties": {}}, dead)])
    assert len(llm.requests) == 1


def test_max_rounds():
    recorder = Recorder()
    llm = ScriptedLLM(*[answer(None, call("add", {"a": k, "b": k}, f"c{k}")) for k in range(5)])
    events = []
    result = run_agent(llm, USER, [add_tool(recorder)], max_rounds=3, on_event=events.append)
    assert result.stop == "max_rounds" and result.rounds == 3 and len(llm.requests) == 3
    assert recorder.calls == [{"a": 0, "b": 0}, {"a": 1, "b": 1}]  # the third turn's call was not run...
    assert result.messages[-1] == {"role": "tool", "tool_call_id": "c2",  # ...but answered, so history stays valid
                                   "content": "not run: the limit of 3 rounds of tool calls was reached"}
    assert events[-1].kind == "max_rounds"
    with pytest.raises(ValueError, match="max_rounds must be a positive integer"):
        run_agent(llm, USER, [], max_rounds=0)


def test_tool_choice_applies_to_the_first_round_only():
    llm = ScriptedLLM(answer(None, call("add", {"a": 1, "b": 2})), answer("3"))
    run_agent(llm, USER, [add_tool()], tool_choice="required")
    assert [r["tool_choice"] for r in llm.requests] == ["required", "auto"]


def test_bad_tool_lists():
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        run_agent(ScriptedLLM(), USER, [add_tool(), add_tool()])
    with pytest.raises(TypeError, match="qwen35.agent.Tool"):
        run_agent(ScriptedLLM(), USER, [{"type": "function"}])
    with pytest.raises(ValueError, match="JSON schema of type 'object'"):
        Tool("t", "", {"type": "string"}, print)


def test_check_arguments():
    schema = {"type": "object", "required": ["xs"],
              "properties": {"xs": {"type": "array", "items": {"type": "number"}},
                             "when": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                             "flag": {"type": "boolean"}}}
    assert check_arguments(schema, {"xs": [1, 2.5], "when": None, "flag": True}) == []
    assert check_arguments(schema, {"xs": [1, "two"], "flag": 1}) == [
        "'xs'[1] must be number, got \"two\"", "'flag' must be boolean, got 1"]
    assert check_arguments(schema, {"xs": [], "when": 3}) == ["'when': 3 matches none of the allowed forms"]
    assert check_arguments({"type": "object", "properties": {"n": {"type": "integer"}}}, {"n": 2.0}) == []


def test_format_call():
    assert format_call("calculator", '{"expression": "2+2"}') == 'calculator(expression="2+2")'
    assert format_call("lookup", {"topic": "capital", "name": "Peru"}) == 'lookup(topic="capital", name="Peru")'
    assert format_call("now", "{}") == "now()"
    assert format_call("python", {"code": "x = 1\nprint(x)"}) == "python\n  code:\n    x = 1\n    print(x)"
    assert format_call("odd", "not json") == "odd(not json)"


def test_the_embedded_model_uses_the_mcp_calculator(embedded_llm, mcp_client):
    """The real model and the real server: the embedded model was trained to call a tool named ``calculator``
    (qwen35/train/data.py) and to answer "The answer is N." from its result; greedy decoding does so here."""
    from qwen35.engine import SamplingParams

    calculator = [t for t in mcp_client.tools if t.name == "calculator"]
    events = []
    result = run_agent(embedded_llm, [{"role": "user", "content": "What is 123 * 45?"}], calculator,
                       params=SamplingParams(temperature=0.0, max_tokens=128), enable_thinking=False,
                       on_event=events.append)
    ran = [e for e in events if e.kind == "tool_result"]
    assert [(e.call.name, json.loads(e.call.arguments), e.text) for e in ran] == [
        ("calculator", {"expression": "123 * 45"}, "5535")]
    assert result.stop == "answer" and result.rounds == 2
    assert result.messages[2] == {"role": "tool", "tool_call_id": ran[0].call.id, "content": "5535"}
    assert "5535" in result.content
