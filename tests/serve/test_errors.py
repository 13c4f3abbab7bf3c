"""Bad input gets a 4xx with an OpenAI-style error body naming what is wrong, and the server stays up."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import API_KEY, MAX_BODY_BYTES, MAX_TOKENS_CAP, MODEL_NAME, chat_body, metrics

TOOL = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _check_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return error


CHAT_CASES = {
    # name: (body fields to change, words the message must contain, expected param)
    "messages not a list": (dict(messages="hi"), ["messages"], "messages"),
    "empty messages": (dict(messages=[]), ["messages", "non-empty"], "messages"),
    "message not an object": (dict(messages=[1]), ["messages[0]"], "messages"),
    "unknown role": (dict(messages=[{"role": "robot", "content": "hi"}]), ["role", "robot"], "messages"),
    "system not first": (dict(messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]),
                         ["system message"], "messages"),
    "content wrong type": (dict(messages=[{"role": "user", "content": 5}]), ["content"], "messages"),
    "negative max_tokens": (dict(max_tokens=-1), ["max_tokens"], "max_tokens"),
    "zero max_tokens": (dict(max_tokens=0), ["max_tokens"], "max_tokens"),
    "huge max_tokens": (dict(max_tokens=10 ** 12), ["max_tokens", str(MAX_TOKENS_CAP)], "max_tokens"),
    "huge max_completion_tokens": (dict(max_completion_tokens=10 ** 6), ["max_completion_tokens"],
                                   "max_completion_tokens"),
    "max_tokens as string": (dict(max_tokens="10"), ["max_tokens", "integer"], "max_tokens"),
    "negative temperature": (dict(temperature=-0.5), ["temperature", ">= 0"], "temperature"),
    "temperature as string": (dict(temperature="hot"), ["temperature"], "temperature"),
    "top_p zero": (dict(top_p=0), ["top_p"], "top_p"),
    "presence_penalty too big": (dict(presence_penalty=5), ["presence_penalty"], "presence_penalty"),
    "n zero": (dict(n=0), ["n:"], "n"),
    "n huge": (dict(n=10 ** 6), ["n:"], "n"),
    "n as bool": (dict(n=True), ["n:"], "n"),
    "stream as string": (dict(stream="yes"), ["stream"], "stream"),
    "seed as string": (dict(seed="1"), ["seed"], "seed"),
    "stop not strings": (dict(stop=5), ["stop"], "stop"),
    "empty stop string": (dict(stop=[""]), ["stop"], "stop"),
    "top_logprobs too many": (dict(logprobs=True, top_logprobs=50), ["top_logprobs"], "top_logprobs"),
    "top_logprobs without logprobs": (dict(top_logprobs=2), ["logprobs"], "top_logprobs"),
    "unknown field": (dict(max_token=5), ["max_token", "unknown field"], "max_token"),
    "stream_options wrong type": (dict(stream=True, stream_options={"include_usage": "yes"}), ["include_usage"],
                                  "stream_options"),
    "invalid tool": (dict(tools=[{"type": "function"}]), ["tools[0].function"], "tools"),
    "tool with a bad name": (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), ["name"], "tools"),
    "tool parameters not a schema": (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                                     ["parameters"], "tools"),
    "tools not a list": (dict(tools={"type": "function"}), ["tools"], "tools"),
    "unknown tool_choice": (dict(tools=[TOOL], tool_choice="sometimes"), ["tool_choice"], "tool_choice"),
    "named tool_choice not in tools": (dict(tools=[TOOL], tool_choice={"type": "function",
                                                                       "function": {"name": "nope"}}),
                                       ["nope"], "tool_choice"),
    "required without tools": (dict(tool_choice="required"), ["tools"], "tool_choice"),
    "chat_template_kwargs not an object": (dict(chat_template_kwargs="x"), ["chat_template_kwargs"],
                                           "chat_template_kwargs"),
    "enable_thinking not a bool": (dict(chat_template_kwargs={"enable_thinking": "no"}), ["enable_thinking"],
                                   "enable_thinking"),
    "logit_bias": (dict(logit_bias={"5": 10}), ["logit_bias", "not supported"], "logit_bias"),
    "response_format of an unknown type": (dict(response_format={"type": "xml"}), ["response_format.type"],
                                           "response_format"),
    "functions": (dict(functions=[{"name": "f"}]), ["tools"], "functions"),
    "reasoning_effort": (dict(reasoning_effort="high"), ["enable_thinking"], "reasoning_effort"),
    "over-long prompt": (dict(messages=[{"role": "user", "content": "a" * 5000}]), ["tokens", "context"],
                         "messages"),
}


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_chat_validation_errors_are_400(http, name):
    fields, words, param = CHAT_CASES[name]
    error = _check_error(http.post("/v1/chat/completions", json=chat_body(**fields)), 400, *words)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw, words", [
    (b'{"model": ', ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b"", ["empty"]),
    (b"\xff\xfe", ["JSON"]),
    (b'"just a string"', ["JSON object"]),
])
def test_malformed_bodies_are_400(http, raw, words):
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    _check_error(response, 400, *words)


@pytest.mark.parametrize("fields, words", [
    (dict(prompt=5), ["prompt"]),
    (dict(prompt=[]), ["empty"]),
    (dict(prompt=[10 ** 6]), ["vocabulary"]),
    (dict(prompt=[-1]), ["vocabulary"]),
    (dict(prompt=[[1], [2]]), ["one request per prompt"]),
    (dict(prompt="hi", echo=True), ["echo"]),
    (dict(prompt="hi", logprobs=50), ["logprobs"]),
    (dict(prompt="hi", best_of=3), ["best_of"]),
    (dict(prompt="hi", max_tokens=-3), ["max_tokens"]),
    (dict(prompt=[65] * 5000), ["context"]),
    (dict(), ["prompt"]),
])
def test_completion_errors_are_400(http, fields, words):
    _check_error(http.post("/v1/completions", json={"model": MODEL_NAME, **fields}), 400, *words)


def test_unknown_model_is_404(http):
    error = _check_error(http.post("/v1/chat/completions", json=chat_body(model="gpt-9")), 404, "gpt-9")
    assert error["code"] == "model_not_found" and error["param"] == "model"
    _check_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)


def test_body_over_the_limit_is_413(http):
    big = chat_body(messages=[{"role": "user", "content": "a" * (MAX_BODY_BYTES + 10)}])
    _check_error(http.post("/v1/chat/completions", json=big), 413, "limit")

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model": "tiny-qwen35", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"a" * 4096
        yield b'"}]}'

    _check_error(http.post("/v1/chat/completions", content=chunks()), 413)


def test_unknown_path_and_wrong_method(http):
    _check_error(http.get("/v1/nothing"), 404, "/v1/nothing")
    _check_error(http.get("/v1/chat/completions"), 405)


def test_server_is_healthy_after_bad_input_and_counts_it(http, server):
    for name in sorted(CHAT_CASES)[:5]:
        http.post("/v1/chat/completions", json=chat_body(**CHAT_CASES[name][0]))
    assert http.get("/health").json() == {"status": "ok"}
    m = metrics(server.url)
    assert m['qwen35_http_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 5
    ok = http.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_api_key(secured_server):
    url = secured_server.url
    body = chat_body(max_tokens=1)
    error = _check_error(httpx.post(url + "/v1/chat/completions", json=body), 401, "API key")
    assert error["code"] == "invalid_api_key"
    _check_error(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _check_error(httpx.get(url + "/v1/models", headers={"Authorization": API_KEY}), 401)  # no "Bearer"
    good = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert good.status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    # the official client sends the key as a bearer token
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0) as c:
        assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    with openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_openai_client_sees_bad_request(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    assert "messages" in json.dumps(info.value.body)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=2)
