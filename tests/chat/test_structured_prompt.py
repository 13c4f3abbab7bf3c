"""response_format and the tool-call grammar of build_chat_prompt.

The grammars are exercised without a model: a random walk picks among the tokens the grammar allows (biased towards
the characters of the format's markers, to try hard to break out of a value), and every finished walk must parse,
with the project's own parser, into calls whose arguments validate against the tool's schema.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from qwen35.chat import Tokenizer
from qwen35.chat.completion import (
    _TEXT_VALUE,
    _no_markers_regex,
    build_chat_prompt,
    normalize_response_format,
    parse_chat_output,
    tool_call_grammar,
)
from qwen35.engine.params import SamplingParams, StructuredSpec

from .tiny_tokenizer import write_tiny_tokenizer

HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
        "coords": {"type": "object", "properties": {"lat": {"type": "number"}, "note": {"type": "string"}},
                   "required": ["lat", "note"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "label": {"type": ["string", "null"], "maxLength": 6},
        "kind": {"$ref": "#/$defs/kind"},
    }, "required": ["city", "days", "coords"], "$defs": {"kind": {"enum": [1, 2, 3]}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "minLength": 2, "maxLength": 12}},
    "required": ["query"]}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters at all
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "why": {"type": "string", "maxLength": 10}},
          "required": ["answer", "why"], "additionalProperties": False}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("structured_chat_tok")))


# =============================================================================================
# response_format


@pytest.mark.parametrize("value, words", [
    ("json", "response_format must be an object"),
    ({"type": "xml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": ["json_object"]}, "response_format.type"),
    ({"type": "json_object", "schema": {}}, "unknown field"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}, "unknown field"),
    ({"type": "json_schema", "json_schema": {"name": "a", "description": 5}}, "description"),
])
def test_malformed_response_format_names_the_field(tok, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        normalize_response_format(value)
    with pytest.raises(ValueError, match=r"^response_format"):
        build_chat_prompt(tok, HELLO, response_format=value)


def test_response_format_shapes(tok):
    assert normalize_response_format(None) is None and normalize_response_format({"type": "text"}) is None
    assert build_chat_prompt(tok, HELLO, response_format={"type": "text"}).structured is None

    p = build_chat_prompt(tok, HELLO, response_format={"type": "json_object"}, enable_thinking=False)
    assert p.structured == {"kind": "json_object"} and p.structured_source == "response_format"
    # thinking on: the reasoning is free, the format starts after </think>
    p = build_chat_prompt(tok, HELLO, response_format=JSON_FORMAT)
    assert p.thinking and p.structured == {"kind": "json_schema", "value": ANSWER, "strict": True,
                                           "after": "</think>", "after_excludes": ("<tool_call>",)}
    params = p.sampling_params(SamplingParams(max_tokens=50))
    assert params.structured == StructuredSpec.json(ANSWER, strict=True, after="</think>",
                                                    after_excludes=["<tool_call>"])
    # no schema given: any JSON
    assert normalize_response_format({"type": "json_schema", "json_schema": {"name": "x"}})["value"] == {}


def test_forced_call_wins_over_response_format(tok):
    p = build_chat_prompt(tok, HELLO, tools=[WEATHER], tool_choice="required", response_format=JSON_FORMAT)
    assert p.structured["kind"] == "lark" and p.structured_source == "tools" and "after" not in p.structured
    assert p.prefill.endswith("<function=get_weather>\n")


def test_tool_choice_none_keeps_only_the_format(tok):
    p = build_chat_prompt(tok, HELLO, tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"},
                          enable_thinking=False)
    assert p.structured == {"kind": "json_object"}


def test_a_required_parameter_that_cannot_be_written_is_an_error(tok):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a>b": {"type": "string"}}, "required": ["a>b"]}}}
    with pytest.raises(ValueError, match=r"^tools: the required parameter 'a>b'"):
        build_chat_prompt(tok, HELLO, tools=[tool], tool_choice="required")
    optional = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a>b": {"type": "string"}}}}}
    assert "a>b" not in build_chat_prompt(tok, HELLO, tools=[optional], tool_choice="required").structured["value"]


# =============================================================================================
# the grammar itself


def test_no_markers_regex_agrees_with_substring_search():
    regex = re.compile(_no_markers_regex().replace("\\/", "/"))
    pieces = ["<", "/", "parameter", "param", ">", "=", "function", "tool_call", "tool", "x", "\n", "<<", " "]
    rng = random.Random(0)
    markers = ("</parameter>", "<parameter=", "</function>", "</tool_call>")
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert bool(regex.fullmatch(text)) == (not any(m in text for m in markers)), text


llguidance = None


@pytest.fixture(scope="module")
def compiler(tok):
    global llguidance
    llguidance = pytest.importorskip("llguidance")
    from qwen35.engine.structured import StructuredCompiler

    return StructuredCompiler(tok, tok.stop_token_ids)


MARKER_BYTES = {ord(c) for c in "<>/=\n\"{}[],:0123456789"}
EXIT = "\n</parameter>\n"


def walk(compiler, spec: StructuredSpec, rng: random.Random, limit: int = 3000) -> tuple[str, bool]:
    """Generate by picking allowed tokens at random, marker characters 30x likelier; now and then it tries to close
    a value (types the bytes of "\n</parameter>\n" while the grammar lets it).  Returns (text, finished)."""
    m = compiler.matcher(spec)
    tokens: list[int] = []
    eos = set(compiler._tok.eos_tokens)

    def allowed() -> list[int]:
        return compiler.allowed_mask([m])[0].nonzero().flatten().tolist()

    while not m.done and len(tokens) < limit:
        options = allowed()
        if m.accepting and rng.random() < 0.5:
            break  # the model ends the turn here
        if rng.random() < 0.05:
            for ch in EXIT.encode():
                if ch not in allowed():
                    break
                assert m.advance(ch)
                tokens.append(ch)
            continue
        choices = [t for t in options if t not in eos]
        if not choices:
            break
        t = rng.choices(choices, [30 if t in MARKER_BYTES else 1 for t in choices])[0]
        assert m.advance(t), m.error
        tokens.append(t)
    return compiler._tok.decode_str(tokens), m.done or m.accepting


def check_calls(prompt, text: str, tools, names: set[str], at_least: int = 1, at_most: int | None = None) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    parsed = parse_chat_output(prompt, text)
    assert len(parsed.tool_calls) >= at_least, (text, parsed)
    if at_most is not None:
        assert len(parsed.tool_calls) <= at_most
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    for call in parsed.tool_calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert not (parsed.content or "").strip(), (text, parsed.content)


@pytest.mark.parametrize("tool_choice, tools, names", [
    ({"type": "function", "function": {"name": "get_weather"}}, [WEATHER, SEARCH], {"get_weather"}),
    ("required", [WEATHER], {"get_weather"}),  # one tool: its name is prefilled
    ("required", [WEATHER, SEARCH, PING], {"get_weather", "search", "ping"}),  # the name is generated
])
def test_forced_calls_always_parse_and_validate(tok, compiler, tool_choice, tools, names):
    rng = random.Random(1)
    for parallel in (False, True):
        prompt = build_chat_prompt(tok, HELLO, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel)
        spec = StructuredSpec(**prompt.structured)
        seen = set()
        for _ in range(12):
            text, finished = walk(compiler, spec, rng)
            assert finished, text
            single = tool_choice != "required" or not parallel
            check_calls(prompt, text, tools, names, at_most=1 if single else None)
            seen |= {c.name for c in parse_chat_output(prompt, text).tool_calls}
        if tool_choice == "required" and len(tools) == 3:
            assert len(seen) >= 2  # the walk really chooses between functions


def test_values_never_contain_a_marker(tok, compiler):
    prompt = build_chat_prompt(tok, HELLO, tools=[SEARCH, WEATHER], tool_choice={"type": "function",
                                                                              "function": {"name": "get_weather"}})
    spec = StructuredSpec(**prompt.structured)

    def accepts(text: str) -> bool:
        m = compiler.matcher(spec)
        return all(m.advance(t) for t in tok.encode(text))

    start = "<parameter=city>\n"
    assert accepts(start + "Paris <b>, 3 < 4 </div> <parameter\n</parameter>\n")
    for marker in ("</parameter>", "<parameter=", "</function>", "</tool_call>"):
        assert not accepts(start + f"Par{marker}is")
    # nested strings in a typed (JSON) parameter too
    head = start + "Paris\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=coords>\n"
    assert accepts(head + '{"lat": 1.5, "note": "a<b"}\n</parameter>\n')
    assert not accepts(head + '{"lat": 1.5, "note": "</parameter>')
    # wrong types are not even writable
    assert not accepts(start + "Paris\n</parameter>\n<parameter=days>\nthree")
    assert not accepts(start + "Paris\n</parameter>\n<parameter=days>\n15\n")  # maximum 14
    assert not accepts(start + "Paris\n</parameter>\n</function>")  # "days" is required


def test_auto_tools_with_a_format_answer_json_or_call(tok, compiler):
    jsonschema = pytest.importorskip("jsonschema")
    prompt = build_chat_prompt(tok, HELLO, tools=[SEARCH], response_format=JSON_FORMAT, enable_thinking=False)
    assert prompt.structured["kind"] == "lark" and prompt.structured_source == "response_format"
    spec = StructuredSpec(**prompt.structured)
    rng = random.Random(5)
    kinds = set()
    for _ in range(16):
        text, finished = walk(compiler, spec, rng)
        assert finished, text
        parsed = parse_chat_output(prompt, text)
        if parsed.tool_calls:
            check_calls(prompt, text, [SEARCH], {"search"})
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(parsed.content), ANSWER)
            kinds.add("json")
    assert kinds == {"call", "json"}


def test_response_format_after_thinking(tok, compiler):
    jsonschema = pytest.importorskip("jsonschema")
    prompt = build_chat_prompt(tok, HELLO, response_format=JSON_FORMAT)
    spec = StructuredSpec(**prompt.structured)
    m = compiler.matcher(spec)
    for t in tok.encode("I should answer with JSON.\n</think>\n\n" + '{"answer": 42, "why": "because"}'):
        assert m.advance(t)
    assert m.done
    parsed = parse_chat_output(prompt, "I should answer with JSON.\n</think>\n\n" + '{"answer": 42, "why": "because"}')
    jsonschema.validate(json.loads(parsed.content), ANSWER)
    assert parsed.reasoning == "I should answer with JSON."
    # a tool call opened inside the reasoning would end it for the parser: the grammar does not let one in
    m = compiler.matcher(spec)
    assert not all(m.advance(t) for t in tok.encode("Maybe <tool_call>"))


def test_grammar_text_is_plain_lark():
    g = tool_call_grammar([SEARCH], forced="search", name_prefilled=True, opened=True, parallel=False)
    assert g.startswith("start: f0_args ")
    assert 'f0_p0: "<parameter=query>\\n" F0_P0_VALUE' in g
    assert f"TEXT_VALUE: /{_TEXT_VALUE}/" in g
    assert tool_call_grammar([PING], opened=True).splitlines()[0] == 'start: function ("\\n" call)*'
