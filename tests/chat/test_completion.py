"""qwen35.chat.completion: prompts for each tool_choice, and fixed model outputs read as reasoning, content and
tool calls, streamed and in one go."""

from __future__ import annotations

import json

import pytest

from qwen35.chat import Tokenizer
from qwen35.chat.completion import (
    ChatStreamProcessor,
    build_chat_prompt,
    chat_finish_reason,
    chat_result,
    parse_chat_output,
)
from qwen35.engine import CompletionOutput, RequestOutput, SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "string"}, "days": {"type": "integer"},
        "options": {"type": "object"}, "hours": {"type": "array", "items": {"type": "integer"}}},
    "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
NOTE = {"type": "function", "function": {"name": "write_note", "parameters": {
    "type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH, NOTE]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]

THINK_OPEN = "<|im_start|>assistant\n<think>\n"
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.fixture
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer(tiny_dir)


# ---------------------------------------------------------------------------------------------
# prompts


def test_default_prompt_opens_thinking(tok):
    p = build_chat_prompt(tok, MESSAGES)
    assert p.text.endswith(THINK_OPEN) and p.thinking and p.prefill == "" and p.stop == ()
    assert p.tools is None and p.tool_choice == "none"  # no tools: nothing is parsed as a call


def test_thinking_switch(tok):
    off = build_chat_prompt(tok, MESSAGES, enable_thinking=False)
    assert off.text.endswith(THINK_OFF) and not off.thinking
    via_kwargs = build_chat_prompt(tok, MESSAGES, chat_template_kwargs={"enable_thinking": False})
    assert via_kwargs.text == off.text
    # the argument wins over the template kwargs
    assert build_chat_prompt(tok, MESSAGES, enable_thinking=True,
                             chat_template_kwargs={"enable_thinking": False}).thinking


def test_tool_choice_auto_and_none(tok):
    auto = build_chat_prompt(tok, MESSAGES, tools=TOOLS)
    assert "# Tools" in auto.text and auto.tool_choice == "auto" and auto.tools is not None
    none = build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice="none")
    assert "# Tools" not in none.text and none.tools is None
    assert none.text == build_chat_prompt(tok, MESSAGES).text  # rendered as if there were no tools
    output = "ok\n</think>\n\n" + _call("search", query="x")
    assert parse_chat_output(none, output).tool_calls == []
    assert parse_chat_output(none, output).content.startswith("<tool_call>")


def test_required_prefills_the_start_of_a_call(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice="required")
    assert p.text.endswith(THINK_OFF + "<tool_call>\n<function=")  # thinking skipped, name left to the model
    assert p.prefill == "<tool_call>\n<function=" and not p.thinking and p.forced_function is None
    assert p.stop == ()  # several calls allowed
    # with a single tool the name is not in doubt
    one = build_chat_prompt(tok, MESSAGES, tools=[SEARCH], tool_choice="required")
    assert one.prefill == "<tool_call>\n<function=search>\n" and one.stop == ()


def test_named_function_prefills_the_name_and_stops_after_one_call(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS,
                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert p.text.endswith(THINK_OFF + "<tool_call>\n<function=get_weather>\n")
    assert p.forced_function == "get_weather" and p.stop == ("</tool_call>",)
    params = p.sampling_params(SamplingParams(stop=["END"]))
    assert params.stop == ("END", "</tool_call>")
    # even with thinking requested, a forced call skips it
    assert not build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice="required", enable_thinking=True).thinking


def test_parallel_tool_calls_false_stops_after_the_first_call(tok):
    assert build_chat_prompt(tok, MESSAGES, tools=TOOLS, parallel_tool_calls=False).stop == ("</tool_call>",)
    assert build_chat_prompt(tok, MESSAGES, parallel_tool_calls=False).stop == ()  # no tools, nothing to stop


def test_developer_role_is_the_system_role(tok):
    dev = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    assert build_chat_prompt(tok, dev).text == build_chat_prompt(tok, MESSAGES).text


@pytest.mark.parametrize("kwargs, match", [
    (dict(tool_choice="sometimes"), "tool_choice must be"),
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
    (dict(tool_choice={"type": "function", "function": {}}), "name must be"),
    (dict(tool_choice={"type": "web_search"}), "tool_choice.type"),
    (dict(tool_choice=3), "tool_choice must be"),
    (dict(tools=[], tool_choice="required"), "needs a non-empty tools"),
    (dict(tools=None, tool_choice={"type": "function", "function": {"name": "search"}}), "not in tools"),
    (dict(tools=[{"type": "function"}]), r"tools\[0\].function must be an object"),
    (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), r"tools\[0\].function.name"),
    (dict(tools=[SEARCH, SEARCH]), "defined twice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "parameters.type must be 'object'"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 1}}}}]),
     "properties must map"),
    (dict(tools="search"), "tools must be a list"),
    (dict(chat_template_kwargs={"messages": []}), "may not set messages"),
    (dict(chat_template_kwargs="x"), "chat_template_kwargs must be an object"),
    (dict(chat_template_kwargs={"enable_thinking": "no"}), "enable_thinking must be"),
    (dict(messages=[]), "non-empty list"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), r"messages\[0\].role"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]),
     "System message must be at the beginning"),
    (dict(messages=[{"role": "user", "content": 5}]), r"messages\[0\].content"),
])
def test_invalid_requests_raise_value_error_naming_the_field(tok, kwargs, match):
    kwargs = {"messages": MESSAGES, "tools": TOOLS, **kwargs}
    messages = kwargs.pop("messages")
    with pytest.raises(ValueError, match=match):
        build_chat_prompt(tok, messages, **kwargs)


# ---------------------------------------------------------------------------------------------
# parsing fixed outputs

THREE_CALLS = (
    "The user wants the weather and a note.\n</think>\n\nLet me check.\n\n"
    + _call("get_weather", city="Paris", zip="03106", days="3", options='{"units": {"temp": "C", "wind": [1, 2]}}',
            hours="[6, 12]")
    + "\n" + _call("search", query="Paris <events> & \"news\"", top_k="2")
    + "\n" + _call("write_note", title="日本", body="multi\nline 🚀")
)


def test_reasoning_content_and_three_parallel_calls(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS)
    parsed = parse_chat_output(p, THREE_CALLS)
    assert parsed.reasoning == "The user wants the weather and a note."
    assert parsed.content == "Let me check."
    calls = parsed.tool_calls
    assert [c.name for c in calls] == ["get_weather", "search", "write_note"]
    assert len({c.id for c in calls}) == 3 and all(c.id.startswith("call_") for c in calls)
    args = [json.loads(c.arguments) for c in calls]  # arguments are JSON text, as OpenAI sends them
    assert args[0] == {"city": "Paris", "zip": "03106", "days": 3,
                       "options": {"units": {"temp": "C", "wind": [1, 2]}}, "hours": [6, 12]}
    assert isinstance(args[0]["zip"], str)  # a numeric-looking string stays a string
    assert args[1] == {"query": "Paris <events> & \"news\"", "top_k": 2}
    assert args[2] == {"title": "日本", "body": "multi\nline 🚀"}


def test_only_calls_gives_null_content(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS, enable_thinking=False)
    parsed = parse_chat_output(p, _call("search", query="q"))
    assert parsed.content is None and parsed.reasoning is None and len(parsed.tool_calls) == 1
    assert parse_chat_output(p, "just text").content == "just text"


def test_call_inside_unterminated_thinking_is_found(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS)
    parsed = parse_chat_output(p, "I need the weather.\n\n" + _call("get_weather", city="Oslo"))
    assert parsed.reasoning == "I need the weather."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_prose_mention_of_a_call_in_reasoning_is_not_a_call(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS)
    parsed = parse_chat_output(p, "Should I use <tool_call> here? No.\n</think>\n\nIt is sunny.")
    assert parsed.reasoning == "Should I use <tool_call> here? No." and parsed.content == "It is sunny."
    assert parsed.tool_calls == []


def test_no_reasoning_until_the_end_is_all_reasoning(tok):
    # a random or cut-off model that never closes <think>: all of it is reasoning, the answer is empty
    p = build_chat_prompt(tok, MESSAGES)
    parsed = parse_chat_output(p, "still thinking about it")
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == ("still thinking about it", "", [])


def test_named_choice_prefill_plus_continuation_is_a_call(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS,
                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # generation stops at </tool_call> (a stop string, so not in the text)
    parsed = parse_chat_output(p, "<parameter=city>\nParis\n</parameter>\n<parameter=zip>\n03106\n</parameter>\n"
                                  "</function>\n")
    assert parsed.reasoning is None and parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "zip": "03106"})]
    # garbage after the prefix (a random model) still yields the call, with no arguments
    garbage = parse_chat_output(p, "\x03\u0222 zz > <para")
    assert [(c.name, c.arguments) for c in garbage.tool_calls] == [("get_weather", "{}")]


def test_required_choice_with_an_unknown_function_is_content(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice="required")
    parsed = parse_chat_output(p, "nope>\n</function>\n</tool_call>")
    assert parsed.tool_calls == []
    assert parsed.content == "<tool_call>\n<function=nope>\n</function>\n</tool_call>"
    good = parse_chat_output(p, "search>\n<parameter=query>\ncats\n</parameter>\n</function>\n</tool_call>")
    assert [(c.name, json.loads(c.arguments)) for c in good.tool_calls] == [("search", {"query": "cats"})]


def test_malformed_call_is_content_not_an_error(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS, enable_thinking=False)
    bad = '<tool_call>\n{"name": "search", "arguments": {"query": \n</tool_call>'
    parsed = parse_chat_output(p, bad)
    assert parsed.tool_calls == [] and parsed.content == bad


# ---------------------------------------------------------------------------------------------
# streaming == one shot

def _stream(prompt, chunks: list[str]):
    processor = ChatStreamProcessor(prompt)
    reasoning = content = ""
    calls: dict[int, dict] = {}
    for delta in [processor.feed(c) for c in chunks] + [processor.finish()]:
        reasoning += delta.reasoning
        content += delta.content
        for piece in delta.tool_calls:
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id is not None:
                assert entry["id"] is None
                entry["id"], entry["name"] = piece.id, piece.name
            entry["arguments"] += piece.arguments
    assert [calls[i]["id"] for i in sorted(calls)] == [c.id for c in processor.calls]
    return reasoning, content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


@pytest.mark.parametrize("case", ["three_calls", "inside_thinking", "named", "required_bad", "plain"])
def test_streamed_deltas_concatenate_to_the_one_shot_parse(tok, case):
    named = {"type": "function", "function": {"name": "get_weather"}}
    prompt, text = {
        "three_calls": (build_chat_prompt(tok, MESSAGES, tools=TOOLS), THREE_CALLS),
        "inside_thinking": (build_chat_prompt(tok, MESSAGES, tools=TOOLS),
                            "Plan </thi </think> no\n" + _call("search", query="a") + " tail"),
        "named": (build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice=named),
                  "<parameter=city>\nRome\n</parameter>\n</function>\n"),
        "required_bad": (build_chat_prompt(tok, MESSAGES, tools=TOOLS, tool_choice="required"), "x y>\nz"),
        "plain": (build_chat_prompt(tok, MESSAGES), "思考 🤔\n</think>\n\n答案 42"),
    }[case]
    parsed = parse_chat_output(prompt, text)
    expected = (parsed.reasoning or "", parsed.content or "", [(c.name, c.arguments) for c in parsed.tool_calls])
    for cut in range(len(text) + 1):
        assert _stream(prompt, [text[:cut], text[cut:]]) == expected, cut
    assert _stream(prompt, list(text)) == expected


# ---------------------------------------------------------------------------------------------
# results


def test_finish_reason():
    assert chat_finish_reason("stop", True) == "tool_calls"
    assert chat_finish_reason("stop", False) == "stop"
    assert chat_finish_reason("length", True) == "length"  # a call cut off may be incomplete
    assert chat_finish_reason(None, False) is None


def test_chat_result_from_engine_output(tok):
    p = build_chat_prompt(tok, MESSAGES, tools=TOOLS)
    outputs = [CompletionOutput(0, THREE_CALLS, [1, 2, 3], "stop", 258),
               CompletionOutput(1, "hmm", [4, 5], "length")]
    result = chat_result(p, RequestOutput("r1", p.text, [7] * 10, outputs, finished=True))
    assert result.usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    first, second = result.choices
    assert first.finish_reason == "tool_calls" and len(first.tool_calls) == 3 and first.stop_reason == 258
    assert (second.finish_reason, second.reasoning, second.content, second.tool_calls) == ("length", "hmm", "", [])
    assert result.content == "Let me check." and result.token_ids == [1, 2, 3]
    message = result.message  # ready to append to the conversation; the template renders it back
    assert message["role"] == "assistant" and message["reasoning_content"].startswith("The user wants")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "search", "write_note"]
    history = MESSAGES + [message, {"role": "tool", "content": "sunny"}]
    again = build_chat_prompt(tok, history, tools=TOOLS)
    assert "<parameter=zip>\n03106\n</parameter>" in again.text and "<tool_response>\nsunny" in again.text
