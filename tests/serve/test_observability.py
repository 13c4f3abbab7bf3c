"""What operators and SDK generators read: latency histograms in /metrics, one access-log line per request, and an
/openapi.json that describes the request bodies and the error responses."""

from __future__ import annotations

import logging

import httpx

from .conftest import MODEL_NAME, chat_body, metrics, wait_idle


def _count(m: dict[str, float], name: str) -> float:
    return m.get(f"{name}_count", 0.0)


HISTOGRAMS = ("qwen35_time_to_first_token_seconds", "qwen35_e2e_request_latency_seconds",
              "qwen35_request_queue_time_seconds", "qwen35_request_prompt_tokens_per_second",
              "qwen35_request_decode_tokens_per_second")


def test_latency_histograms_count_each_request(server, caplog):
    wait_idle(server.url)
    before = metrics(server.url)
    with caplog.at_level(logging.INFO, logger="qwen35.access"):
        r = httpx.post(server.base_url + "/chat/completions", timeout=60,
                       json=chat_body(max_tokens=6, temperature=0, ignore_eos=True, stream=True))
        assert r.status_code == 200 and "[DONE]" in r.text
        r = httpx.post(server.base_url + "/completions", timeout=60,
                       json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200
    wait_idle(server.url)
    after = metrics(server.url)
    for name in HISTOGRAMS:
        assert _count(after, name) - _count(before, name) == 2, name
    # 6 + 5 tokens: 5 + 4 gaps, observed per delivery (a delivery of several tokens is one observation)
    gaps = _count(after, "qwen35_inter_token_latency_seconds") - _count(before, "qwen35_inter_token_latency_seconds")
    assert 1 <= gaps <= 9
    ttft = after["qwen35_time_to_first_token_seconds_sum"] - before.get("qwen35_time_to_first_token_seconds_sum", 0)
    e2e = after["qwen35_e2e_request_latency_seconds_sum"] - before.get("qwen35_e2e_request_latency_seconds_sum", 0)
    assert 0 < ttft <= e2e
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen35.access"]
    assert len(lines) == 2
    chat, completion = sorted(lines)  # "/v1/chat..." sorts before "/v1/completions"
    assert chat.startswith("/v1/chat/completions chatcmpl-") and " ok " in chat
    assert "prompt_tokens=" in chat and "completion_tokens=6" in chat and "finish=length" in chat
    for field in ("queue=", "ttft=", "e2e=", "decode="):
        assert field in chat and f"{field}-" not in chat, field
    assert completion.startswith("/v1/completions cmpl-") and "completion_tokens=5" in completion


def test_an_aborted_request_is_logged_as_such(server, caplog):
    with caplog.at_level(logging.INFO, logger="qwen35.access"):
        with httpx.stream("POST", server.base_url + "/chat/completions", timeout=60,
                          json=chat_body(max_tokens=500, ignore_eos=True, stream=True)) as r:
            for _ in r.iter_lines():
                break  # the client goes away after the first event
        wait_idle(server.url)
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen35.access"]
    assert any(" aborted " in line for line in lines), lines


def test_openapi_describes_bodies_and_errors(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schemas[ref.rsplit("/", 1)[-1]]
    assert {"messages", "tools", "tool_choice", "stream", "temperature", "max_tokens"} <= set(body["properties"])
    assert "messages" in body["required"] and body["additionalProperties"] is False
    for status in ("400", "401", "404", "413", "500"):
        error = chat["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert error == "#/components/schemas/Error"
    assert set(schemas["Error"]["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}
    completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in schemas[completion["$ref"].rsplit("/", 1)[-1]]["properties"]
    # every reference resolves inside the document
    text = str(doc)
    import re
    for name in set(re.findall(r"#/components/schemas/([A-Za-z0-9_.\-]+)", text)):
        assert name in schemas, name
    # the documented error shape is what a bad request really gets
    r = httpx.post(server.base_url + "/chat/completions", json={"model": MODEL_NAME}, timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_speculative_counters_in_metrics(checkpoint):
    import qwen35
    from qwen35.engine import AsyncLLM
    from qwen35.serve import create_app

    from .conftest import _start

    llm = qwen35.LLM(checkpoint, dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    engine = AsyncLLM(llm.engine)
    try:
        for running in _start(create_app(engine, MODEL_NAME)):
            prompt = [5, 6, 7] * 8  # a prompt that repeats itself: prompt lookup finds drafts
            r = httpx.post(running.base_url + "/completions", timeout=60,
                           json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200
            m = metrics(running.url)
            assert m["qwen35_spec_proposed_tokens_total"] == llm.engine.drafter.stats.proposed > 0
            assert m["qwen35_spec_accepted_tokens_total"] == llm.engine.drafter.stats.accepted
    finally:
        engine.shutdown()


def test_cached_prompt_tokens_in_usage(client):
    messages = [{"role": "system", "content": "You are terse. " * 12}, {"role": "user", "content": "Hello there!"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens  # served from the prefix cache, at least one token computed
    assert again.choices[0].message.content == first.choices[0].message.content
