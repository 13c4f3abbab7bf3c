"""Acceptance of structured output: 100 sampled generations (temperature 1, different seeds, batched as two n=50
requests) each of a json_schema answer and of a forced tool call, through the official openai client, from the
random-weight checkpoint of conftest.py and from the embedded model; every one must validate against its schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .conftest import MODEL_NAME, _start
from .test_structured_api import ASK, FLIGHT, HOTEL, NO_THINKING, PERSON, PERSON_FORMAT, _valid_calls

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")


def _acceptance(client, *, messages, thinking: bool, tools, tool_choice, schema_format, schema,
                max_tokens: int) -> dict:
    extra = {} if thinking else NO_THINKING
    valid = {"json_schema": 0, "tool_call": 0}
    names = {t["function"]["name"] for t in tools}
    for seed in (0, 1000):  # two requests of n=50: 100 differently seeded samples, batched
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, response_format=schema_format, n=50,
                                             temperature=1.0, seed=seed, max_tokens=max_tokens, extra_body=extra)
        for c in out.choices:
            try:
                jsonschema.validate(json.loads(c.message.content), schema)
                valid["json_schema"] += c.finish_reason == "stop"
            except (ValueError, TypeError, jsonschema.ValidationError):
                pass
        # one call per answer: with parallel calls a model that never stops calling is cut off by max_tokens
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=tools, tool_choice=tool_choice,
                                             parallel_tool_calls=False, n=50, temperature=1.0, seed=seed,
                                             max_tokens=max_tokens)
        for c in out.choices:
            try:
                valid["tool_call"] += (c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
                                       and _valid_calls(c.message, tools, names))
            except (ValueError, jsonschema.ValidationError):
                pass
    return valid


def _client_for(llm) -> Iterator:
    from qwen35.engine import AsyncLLM
    from qwen35.serve import create_app

    engine = AsyncLLM(llm.engine)
    try:
        for running in _start(create_app(engine, MODEL_NAME)):
            with openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=300) as c:
                yield c
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def random_weights_client(checkpoint) -> Iterator:
    """The random-weight checkpoint of conftest.py, with room for a whole n=50 request per step."""
    import qwen35

    yield from _client_for(qwen35.LLM(checkpoint, dtype="float32", max_num_seqs=50, max_num_batched_tokens=4096))


@pytest.fixture(scope="module")
def embedded_client() -> Iterator:
    import qwen35

    yield from _client_for(qwen35.LLM(max_num_seqs=50, max_num_batched_tokens=4096))


@pytest.mark.slow
def test_acceptance_random_weights(random_weights_client):
    """Thinking off (a random model never writes </think>); "required" with two tools, so the name is generated too.
    A byte tokenizer: every character of a call is a token, hence the max_tokens."""
    valid = _acceptance(random_weights_client, messages=ASK, thinking=False, tools=[FLIGHT, HOTEL],
                        tool_choice="required", schema_format=PERSON_FORMAT, schema=PERSON, max_tokens=600)
    assert valid == {"json_schema": 100, "tool_call": 100}


@pytest.mark.slow
def test_acceptance_embedded_model(embedded_client):
    """The shipped model thinks first (thinking on, its trained mode), then the format applies after </think>; its
    calculator calls are forced (the expression is free text)."""
    from qwen35.train.data import CALCULATOR_TOOL

    answer = {"type": "object", "properties": {
        "answer": {"type": "integer", "minimum": -1000, "maximum": 10000},
        "explanation": {"type": "string", "maxLength": 40},
        "confident": {"type": "boolean"},
    }, "required": ["answer", "explanation", "confident"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer, "strict": True}}
    valid = _acceptance(embedded_client, messages=[{"role": "user", "content": "What is 47 * 38?"}], thinking=True,
                        tools=[CALCULATOR_TOOL], tool_choice={"type": "function", "function": {"name": "calculator"}},
                        schema_format=fmt, schema=answer, max_tokens=400)
    assert valid == {"json_schema": 100, "tool_call": 100}
