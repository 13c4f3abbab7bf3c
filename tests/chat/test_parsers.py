"""Reasoning and tool-call parsing, one-shot and streaming."""

from __future__ import annotations

import json
import re

import pytest

from qwen35.chat import (
    ReasoningStreamParser,
    ToolCallStreamParser,
    convert_parameter,
    parse_tool_calls,
    split_reasoning,
)

# ---------------------------------------------------------------------------------------------
# reasoning


def _stream_reasoning(chunks: list[str], thinking: bool = True) -> tuple[str, str]:
    parser = ReasoningStreamParser(thinking=thinking)
    reasoning = content = ""
    for chunk in chunks:
        delta = parser.feed(chunk)
        reasoning += delta.reasoning
        content += delta.content
    delta = parser.finish()
    return reasoning + delta.reasoning, content + delta.content


REASONING_SAMPLES = {
    # the prompt opened <think>, so only </think> is generated
    "closed": ("The user greets me.\nReply politely.\n</think>\n\nHello! How can I help?",
               ("The user greets me.\nReply politely.", "Hello! How can I help?")),
    # generation stopped while still thinking
    "unfinished": ("Let me think about this  \n", ("Let me think about this", "")),
    # a tool call started inside the thinking block ends the reasoning
    "implicit_end": ("I need the weather.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                     "</parameter>\n</function>\n</tool_call>",
                     ("I need the weather.", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                      "</parameter>\n</function>\n</tool_call>")),
    # mentioning the tag in prose does not
    "mention": ("Should I emit <tool_call> now? Maybe.\n</think>\n\nNo tool needed.",
                ("Should I emit <tool_call> now? Maybe.", "No tool needed.")),
    # a model that re-opens the block
    "reopened": ("<think>\nHmm.\n</think>\n\nYes.", ("Hmm.", "Yes.")),
    # a closing tag in the answer stays in the answer
    "second_close": ("a < b </think> x </think> y", ("a < b", "x </think> y")),
    "empty": ("\n\n</think>\n\nOnly answer", ("", "Only answer")),
    "unicode": ("思考中…🤔\n</think>\n\n答案是 42 ✅", ("思考中…🤔", "答案是 42 ✅")),
}


@pytest.mark.parametrize("name", sorted(REASONING_SAMPLES))
def test_split_reasoning(name):
    text, expected = REASONING_SAMPLES[name]
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("name", sorted(REASONING_SAMPLES))
def test_reasoning_streaming_matches_one_shot_at_every_split(name):
    text, expected = REASONING_SAMPLES[name]
    for cut in range(len(text) + 1):
        assert _stream_reasoning([text[:cut], text[cut:]]) == expected, cut
    for cut_a in range(0, len(text) + 1, 3):  # three pieces, coarser grid
        for cut_b in range(cut_a, len(text) + 1, 2):
            assert _stream_reasoning([text[:cut_a], text[cut_a:cut_b], text[cut_b:]]) == expected
    assert _stream_reasoning(list(text)) == expected  # character by character


def test_reasoning_streaming_token_by_token(qwen_tok):
    # Real token boundaries: </think> is a single token, the rest splits wherever BPE puts it.
    text, expected = REASONING_SAMPLES["unicode"]
    decoder = qwen_tok.incremental_decoder()
    chunks = [decoder.step(i) for i in qwen_tok.encode(text)] + [decoder.finish()]
    assert _stream_reasoning(chunks) == expected


def test_reasoning_never_shows_a_partial_marker():
    parser = ReasoningStreamParser()
    assert parser.feed("Thinking </thi").reasoning == "Thinking"
    assert parser.in_reasoning
    delta = parser.feed("nk>\n\nDone")
    assert (delta.reasoning, delta.content) == ("", "Done")
    assert not parser.in_reasoning
    parser = ReasoningStreamParser()
    assert parser.feed("Plan <tool_call>\n").reasoning == "Plan"
    assert parser.feed("<func").reasoning == ""
    delta = parser.feed("tion=f>")
    assert (delta.reasoning, delta.content) == ("", "<tool_call>\n<function=f>")


def test_thinking_off_is_all_content():
    text = "Direct answer </think> with a stray tag"
    assert split_reasoning("\n" + text, thinking=False) == ("", text)
    for cut in range(len(text) + 1):
        assert _stream_reasoning(["\n" + text[:cut], text[cut:]], thinking=False) == ("", text)


# ---------------------------------------------------------------------------------------------
# tool-call values

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "options": {"type": "object"},
                "ratio": {"type": "number"},
                "note": {"type": ["string", "null"]},
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "mode": {"enum": ["fast", "slow"]},
            },
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
NOTE = {"type": "function", "function": {"name": "write_note", "parameters": {
    "type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH, NOTE]


def _call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.mark.parametrize("raw, schema, expected", [
    ("03106", {"type": "string"}, "03106"),
    ("42", {"type": "string"}, "42"),
    ("true", {"type": "string"}, "true"),
    ("  padded  ", {"type": "string"}, "  padded  "),
    ("42", {"type": "integer"}, 42),
    ("-7", {"type": "integer"}, -7),
    ("5.0", {"type": "integer"}, 5),
    ("007", {"type": "integer"}, 7),
    ("many", {"type": "integer"}, "many"),  # wrong type: passed on as text, never an exception
    ("2.5", {"type": "number"}, 2.5),
    ("3", {"type": "number"}, 3),
    ("NaN", {"type": "number"}, "NaN"),
    ("true", {"type": "boolean"}, True),
    ("False", {"type": "boolean"}, False),  # how the template renders a past Python bool
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("['a', 'b']", {"type": "array"}, ["a", "b"]),
    ('{"a": {"b": [1, null]}}', {"type": "object"}, {"a": {"b": [1, None]}}),
    ("{'a': 1}", {"type": "object"}, {"a": 1}),
    ("null", {"type": ["string", "null"]}, None),
    ("text", {"type": ["string", "null"]}, "text"),
    ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
    ("12", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 12),
    ("12", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 12),
    ("0012", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "0012"),
    ("fast", {"enum": ["fast", "slow"]}, "fast"),
    ("3", {"enum": [1, 3]}, 3),
    ("17", None, 17),  # no schema: JSON when it parses
    ('{"k": 1}', None, {"k": 1}),
    ("hello world", None, "hello world"),
    ("03106", None, "03106"),
])
def test_convert_parameter(raw, schema, expected):
    value = convert_parameter(raw, schema)
    assert value == expected and type(value) is type(expected)


# ---------------------------------------------------------------------------------------------
# tool calls, one-shot


def test_one_call():
    text = "I'll check the weather.\n\n" + _call("get_weather", city="Paris", days="3")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "I'll check the weather."
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == '{"city": "Paris", "days": 3}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}


def test_three_calls_get_distinct_ids():
    text = "\n".join([_call("get_weather", city="Paris"), _call("search", query="news", top_k="5"),
                      _call("write_note", title="t", body="line 1\nline 2")])
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("search", {"query": "news", "top_k": 5}),
        ("write_note", {"title": "t", "body": "line 1\nline 2"}),
    ]
    assert len({c.id for c in calls}) == 3


def test_typed_arguments():
    text = _call("get_weather", city="Zürich 🏔", zip="03106", days="2", metric="true", hours="[9, 12, 18]",
                 options='{"units": {"temp": "C", "wind": ["kmh", null]}, "alerts": false}', ratio="0.5",
                 note="null", limit="null", mode="fast")
    _, calls = parse_tool_calls(text, TOOLS)
    assert json.loads(calls[0].arguments) == {
        "city": "Zürich 🏔", "zip": "03106", "days": 2, "metric": True, "hours": [9, 12, 18],
        "options": {"units": {"temp": "C", "wind": ["kmh", None]}, "alerts": False}, "ratio": 0.5,
        "note": None, "limit": None, "mode": "fast",
    }
    assert '"city": "Zürich 🏔"' in calls[0].arguments  # non-ASCII kept as is


def test_only_one_newline_is_stripped_from_values():
    text = "<tool_call>\n<function=write_note>\n<parameter=body>\n\n  indented\n\n</parameter>\n</function>\n</tool_call>"
    _, calls = parse_tool_calls(text, TOOLS)
    assert json.loads(calls[0].arguments) == {"body": "\n  indented\n"}


def test_a_parameter_outside_the_schema_is_value_text():
    # A name the schema does not list cannot start a parameter: the text is part of the value before it.
    _, calls = parse_tool_calls(_call("search", query="x", extra="[1]", top_k="2"), TOOLS)
    assert json.loads(calls[0].arguments) == {
        "query": "x\n</parameter>\n<parameter=extra>\n[1]", "top_k": 2}
    # without a tool list any new name is a parameter
    _, calls = parse_tool_calls(_call("search", query="x", extra="[1]"))
    assert json.loads(calls[0].arguments) == {"query": "x", "extra": [1]}


def test_content_around_calls():
    text = "Before.\n\n" + _call("search", query="a") + "\n\nBetween.\n" + _call("search", query="b") + "\n"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Before.\n\nBetween."
    assert [json.loads(c.arguments)["query"] for c in calls] == ["a", "b"]


def test_no_tools_means_any_function_name():
    _, calls = parse_tool_calls(_call("anything", n="5", s="text"), None)
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("anything", {"n": 5, "s": "text"})


def test_json_body_fallback():
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "q", "top_k": 3}}\n</tool_call>'
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and calls[0].name == "search"
    assert json.loads(calls[0].arguments) == {"query": "q", "top_k": 3}


def test_missing_closing_tags_are_tolerated():
    # </parameter> and </function> may be left out before the end of the call ...
    text = "<tool_call>\n<function=search>\n<parameter=query>\nx\n</parameter>\n<parameter=top_k>\n2\n</tool_call>"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and json.loads(calls[0].arguments) == {"query": "x", "top_k": 2}
    # ... but a parameter header without the </parameter> before it is value text (it may be quoted code)
    text = "<tool_call>\n<function=search>\n<parameter=query>\nx\n<parameter=top_k>\n2\n</tool_call>"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and json.loads(calls[0].arguments) == {"query": "x\n<parameter=top_k>\n2"}


MALFORMED = [
    "<tool_call>\n<function=delete_everything>\n</function>\n</tool_call>",  # unknown function
    "<tool_call>\nget_weather(city='Paris')\n</tool_call>",  # not the XML form
    '<tool_call>\n{"name": "search", "arguments": {"query": \n</tool_call>',  # broken JSON
    '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # JSON naming an unknown function
    "<tool_call>\n<function=get_wea",  # cut off inside the header
    "<tool_call>\n<function=get\nweather>\n</function>\n</tool_call>",  # newline in the name
    "<tool_call>",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_call_is_returned_as_content(bad):
    text = "Sure.\n" + bad
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_malformed_call_followed_by_a_good_one():
    text = MALFORMED[0] + "\n" + _call("search", query="ok")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == MALFORMED[0]
    assert [c.name for c in calls] == ["search"]
    # text after a call keeps its separation from the text before it
    text = "Start " + _call("search", query="a") + "\n" + _call("search", query="b") + "\nend.\n"
    assert parse_tool_calls(text, TOOLS)[0] == "Start\nend.\n"
    assert parse_tool_calls(_call("search", query="a") + "\n\nAfter.", TOOLS)[0] == "After."


def test_truncated_call_keeps_complete_parameters():
    text = "<tool_call>\n<function=search>\n<parameter=query>\nnews\n</parameter>\n<parameter=top_k>\n1"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and (calls[0].name, calls[0].arguments) == ("search", '{"query": "news"}')


def test_plain_text_passes_through():
    text = "No calls here, just a < sign and <tool_cal text.\n"
    assert parse_tool_calls(text, TOOLS) == (text, [])


# ---------------------------------------------------------------------------------------------
# tool calls, streaming

STREAM_SAMPLES = [
    "Checking now.\n\n" + _call("get_weather", city="Paris", zip="03106", days="3",
                                options='{"a": {"b": [1, 2]}}'),
    "\n".join([_call("get_weather", city="Rome"), _call("search", query="x < y", top_k="2"),
               _call("write_note", title="日本", body="multi\nline 🚀")]),
    "Text " + MALFORMED[0] + " more text\n" + _call("search", query="q") + "\ntrailing words",
    "<tool_call>\n<function=search>\n<parameter=query>\nhalf",
    '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"j\\"}"}</tool_call> done',
    "a <tool_c b <tool_call>\n<nonsense> <tool_call>\n<function=search>\n</function>\n</tool_call>",
]


def _stream_tools(chunks: list[str]):
    parser = ToolCallStreamParser(TOOLS)
    content = ""
    pieces: dict[int, dict] = {}
    for delta in [parser.feed(c) for c in chunks] + [parser.finish()]:
        content += delta.content
        assert "<tool_call" not in delta.content or "<tool_call>" in content  # no half tags
        for piece in delta.tool_calls:
            entry = pieces.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id is not None:
                assert entry["id"] is None  # id and name come once, in the first piece
                entry["id"], entry["name"] = piece.id, piece.name
            entry["arguments"] += piece.arguments
    calls = [pieces[i] for i in sorted(pieces)]
    assert sorted(pieces) == list(range(len(pieces)))
    assert [c["id"] for c in calls] == [c.id for c in parser.calls]
    return content, [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("sample", range(len(STREAM_SAMPLES)))
def test_tool_streaming_matches_one_shot_at_every_split(sample):
    text = STREAM_SAMPLES[sample]
    content, calls = parse_tool_calls(text, TOOLS)
    expected = (content, [(c.name, c.arguments) for c in calls])
    for cut in range(len(text) + 1):
        assert _stream_tools([text[:cut], text[cut:]]) == expected, cut
    assert _stream_tools(list(text)) == expected


def test_tool_streaming_token_by_token(qwen_tok):
    text = STREAM_SAMPLES[1]
    decoder = qwen_tok.incremental_decoder()
    chunks = [decoder.step(i) for i in qwen_tok.encode(text)] + [decoder.finish()]
    content, calls = parse_tool_calls(text, TOOLS)
    assert _stream_tools(chunks) == (content, [(c.name, c.arguments) for c in calls])


def test_stream_announces_name_first_then_arguments():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Let me search.\n\n<tool_ca").content == "Let me search."
    assert parser.feed("ll>\n<function=sea").tool_calls == []
    first = parser.feed("rch>\n<parameter=query>\nca").tool_calls
    assert first[0].name == "search" and first[0].id and first[0].arguments == ""
    assert first[0].to_openai() == {"index": 0, "id": first[0].id, "type": "function",
                                    "function": {"name": "search", "arguments": ""}}
    # a string parameter streams as it arrives; the closing quote waits until the value is known to end
    assert [d.arguments for d in first[1:]] == ['{"query": "', "ca"]
    assert [d.arguments for d in parser.feed("ts\n</parameter>\n").tool_calls] == ["ts"]
    assert [d.arguments for d in parser.feed("</function>\n</tool_call>").tool_calls] == []
    assert [d.arguments for d in parser.finish().tool_calls] == ['"', "}"]
    assert parser.calls[0].arguments == '{"query": "cats"}'


def test_reasoning_then_tools_pipeline():
    # What a server does with a thinking-mode completion: reasoning first, tools in the answer.
    output = "The user wants weather.\n</think>\n\nLet me check.\n\n" + _call("get_weather", city="Oslo")
    reasoning, answer = split_reasoning(output)
    content, calls = parse_tool_calls(answer, TOOLS)
    assert (reasoning, content) == ("The user wants weather.", "Let me check.")
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}


# ---------------------------------------------------------------------------------------------
# randomised: streaming equals one-shot for arbitrary soups of markers and text

_FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=search>", "<function=get_weather>", "<function=nope>", "</function>",
    "<parameter=query>", "<parameter=days>", "</parameter>", "<parameter=", "<function=", "\n", "\n\n", " ",
    "hello", "42", "03106", "{", "}", '{"name": "search", "arguments": {"query": "x"}}', "<", ">", "</think>",
    "<think>", "<tool_", "</para", "中文", "🚀", "true", "[1, 2]", "\t", "=", "</thi",
]


def test_random_texts_stream_like_one_shot():
    import random

    rng = random.Random(1234)
    for _ in range(1500):
        text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(1, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        content, calls = parse_tool_calls(text, TOOLS)
        assert _stream_tools(chunks) == (content, [(c.name, c.arguments) for c in calls]), chunks
        for thinking in (True, False):
            assert _stream_reasoning(chunks, thinking) == split_reasoning(text, thinking), chunks
