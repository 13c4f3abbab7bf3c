"""Structured output through the official openai client: response_format (json_object, json_schema, a pydantic
model through ``client.chat.completions.parse``), forced tool calls, streaming and the error cases.  The acceptance
check (100 samples per case) is in test_structured_acceptance.py.
"""

from __future__ import annotations

import json
import httpx
import pytest

from .conftest import MODEL_NAME
from .test_openai_api import _stream_chat

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

# Bounded values: a random model must finish inside max_tokens (the grammar decides what is written, not how long).
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    "member": {"type": "boolean"},
    "address": {"type": "object", "properties": {
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": ["string", "null"], "maxLength": 10},
    }, "required": ["zip", "country"], "additionalProperties": False},
}, "required": ["name", "age", "pets", "member", "address"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
FLIGHT = {"type": "function", "function": {"name": "book_flight", "description": "Book a flight", "parameters": {
    "type": "object", "properties": {
        "origin": {"type": "string", "minLength": 3, "maxLength": 3},
        "destination": {"type": "string", "minLength": 3, "maxLength": 3},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "cabin": {"enum": ["economy", "business", "first"]},
        "refundable": {"type": "boolean"},
        "notes": {"type": "string", "maxLength": 16},
        "legs": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 99}, "maxItems": 3},
    }, "required": ["origin", "destination", "passengers", "cabin"]}}}
HOTEL = {"type": "function", "function": {"name": "book_hotel", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "nights": {"type": "integer", "minimum": 1, "maximum": 30}},
    "required": ["city", "nights"]}}}
ASK = [{"role": "user", "content": "Book me a flight from Paris to Rome for two."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # a random model never writes </think>


def _schema_of(tools, name):
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)


def _valid_calls(message, tools, names) -> bool:
    if not message.tool_calls:
        return False
    for call in message.tool_calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), _schema_of(tools, call.function.name))
    return True


def test_json_schema_answers_validate(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=PERSON_FORMAT, n=4,
                                         temperature=1.0, seed=11, max_tokens=200, extra_body=NO_THINKING)
    assert len({c.message.content for c in out.choices}) > 1
    for choice in out.choices:
        assert choice.finish_reason == "stop" and choice.message.tool_calls is None
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(messages=ASK, response_format=PERSON_FORMAT, temperature=0, max_tokens=200, extra_body=NO_THINKING)
    full = client.chat.completions.create(model=MODEL_NAME, **kwargs)
    streamed = _stream_chat(client, **kwargs)["choices"][0]
    assert streamed["content"] == full.choices[0].message.content and streamed["finish"] == "stop"
    jsonschema.validate(json.loads(streamed["content"]), PERSON)


def test_json_object(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format={"type": "json_object"},
                                         temperature=0, max_tokens=300, extra_body=NO_THINKING)
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # an unbounded object may run past max_tokens; what there is is still a JSON prefix
        assert out.choices[0].message.content.startswith("{")


def test_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        age: int = Field(ge=0, le=30)

    class Owner(BaseModel):
        name: str = Field(max_length=10)
        pets: list[Pet] = Field(max_length=2)

    out = client.chat.completions.parse(model=MODEL_NAME, messages=ASK, response_format=Owner, temperature=0,
                                        max_tokens=200, extra_body=NO_THINKING)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Owner) and len(parsed.name) <= 10


def test_forced_calls_validate_and_stream_the_same(client):
    named = dict(messages=ASK, tools=[HOTEL, FLIGHT], tool_choice={"type": "function",
                                                                  "function": {"name": "book_flight"}},
                 temperature=0, max_tokens=600)  # a byte tokenizer: every character of the XML is a token
    out = client.chat.completions.create(model=MODEL_NAME, **named)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _valid_calls(choice.message, [FLIGHT], {"book_flight"}) and len(choice.message.tool_calls) == 1
    streamed = _stream_chat(client, **named)["choices"][0]
    (only,) = streamed["calls"].values()
    assert (only["name"], only["arguments"]) == ("book_flight", choice.message.tool_calls[0].function.arguments)
    # required with two tools: the name is generated too, and is one of them
    many = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[HOTEL, FLIGHT],
                                          tool_choice="required", parallel_tool_calls=False, n=6, temperature=1.0,
                                          seed=3, max_tokens=600)
    for c in many.choices:
        assert c.finish_reason == "tool_calls" and _valid_calls(c.message, [HOTEL, FLIGHT], {"book_hotel",
                                                                                           "book_flight"})


def test_auto_tools_with_a_format(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[HOTEL], response_format=PERSON_FORMAT,
                                         parallel_tool_calls=False, n=6, temperature=1.0, seed=5, max_tokens=600,
                                         extra_body=NO_THINKING)
    for c in out.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and _valid_calls(c.message, [HOTEL], {"book_hotel"})
        else:
            jsonschema.validate(json.loads(c.message.content), PERSON)


@pytest.mark.parametrize("fields, param, words", [
    (dict(response_format={"type": "xml"}), "response_format", "response_format.type"),
    (dict(response_format="json"), "response_format", "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": PERSON}}), "response_format",
     "response_format.json_schema.name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}),
     "response_format", "JSON schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "string", "format": "no-such-format"}}}),
     "response_format", "JSON schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "wat"}}, "required": ["a"]}}}], tool_choice="required"),
     "tools", "JSON schema"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_formats_are_400_and_the_server_stays_healthy(client, server, fields, param, words, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        if stream:  # refused before the stream begins, not as an error event inside it
            list(client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=5, stream=True,
                                                **fields))
        else:
            client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=5, **fields)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and words in error["message"], error
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ok = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=40, temperature=0,
                                        response_format=PERSON_FORMAT, extra_body=NO_THINKING)
    assert ok.choices[0].finish_reason in ("stop", "length")
