"""The server through the official openai client: chat (streamed and not), reasoning, tools, stop, n, logprobs,
/v1/completions, /v1/models."""

from __future__ import annotations

import json

import httpx
import pytest

from qwen35.chat import split_reasoning

from .conftest import MODEL_NAME

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"},
                                     "days": {"type": "integer"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}}}}
HELLO = [{"role": "user", "content": "Hello! What is 12 + 34?"}]


def _stream_chat(client, **kwargs) -> dict:
    """Run a streamed chat completion and assemble it per choice the way a client would."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in client.chat.completions.create(model=MODEL_NAME, stream=True, **kwargs):
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL_NAME
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            entry = choices.setdefault(c.index, {"reasoning": "", "content": "", "calls": {}, "finish": None,
                                                 "logprobs": [], "chunks_after_finish": 0})
            if entry["finish"] is not None:
                entry["chunks_after_finish"] += 1
            d = c.delta
            entry["reasoning"] += getattr(d, "reasoning_content", None) or ""
            entry["content"] += d.content or ""
            for call in d.tool_calls or []:
                slot = entry["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    assert slot["id"] is None, "id sent twice"
                    slot["id"], slot["name"] = call.id, call.function.name
                slot["arguments"] += call.function.arguments or ""
            if c.logprobs is not None and c.logprobs.content:
                entry["logprobs"] += c.logprobs.content
            if c.finish_reason is not None:
                entry["finish"] = c.finish_reason
    for entry in choices.values():
        assert entry["finish"] is not None and entry["chunks_after_finish"] == 0
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_streaming_concatenates_to_the_non_streamed_answer(client):
    kwargs = dict(messages=HELLO, max_tokens=40, temperature=0)
    full = client.chat.completions.create(model=MODEL_NAME, **kwargs)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert full.usage.completion_tokens == 40 or choice.finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    streamed = _stream_chat(client, **kwargs)["choices"][0]
    assert streamed["reasoning"] == (choice.message.reasoning_content or "")
    assert streamed["content"] == (choice.message.content or "")
    assert streamed["finish"] == choice.finish_reason


def test_reasoning_is_what_comes_before_think_end(client, llm):
    # Thinking is on by default: the prompt opens <think>, so everything the model writes up to </think> is
    # reasoning. A random model rarely writes </think>; then all of it is reasoning, which is the right reading.
    full = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=30, temperature=0)
    message = full.choices[0].message
    assert message.reasoning_content and message.model_extra["reasoning"] == message.reasoning_content
    # the same prompt through /v1/completions gives the raw text; splitting it gives the same fields
    prompt = llm.tokenizer.apply_chat_template(HELLO)
    raw = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0)
    assert raw.usage.prompt_tokens == full.usage.prompt_tokens
    assert split_reasoning(raw.choices[0].text) == (message.reasoning_content, message.content)


def test_thinking_off_gives_content_only(client):
    on = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0)
    off = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.reasoning_content is None and off.choices[0].message.content
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 4  # the empty "\n</think>\n\n" block
    alias = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0,
                                           extra_body={"enable_thinking": False})
    assert alias.choices[0].message.content == off.choices[0].message.content
    streamed = _stream_chat(client, messages=HELLO, max_tokens=12, temperature=0,
                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})["choices"][0]
    assert (streamed["reasoning"], streamed["content"]) == ("", off.choices[0].message.content)


def _clean_window(text: str, size: int) -> str:
    """A substring of ``text`` that occurs once and has no replacement characters (byte soup has many)."""
    for i in range(3, len(text) - size):
        window = text[i:i + size]
        if "\ufffd" not in window and text.index(window) == i and window.strip() == window and window.isprintable():
            return window
    raise AssertionError(f"no clean {size}-character window in the greedy text {text!r}")


def test_stop_sequences(client):
    ref = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=48,
                                    temperature=0).choices[0].text
    stop = _clean_window(ref, 2)
    out = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=48, temperature=0,
                                    stop=[stop, "never-seen"])
    assert out.choices[0].text == ref[:ref.index(stop)] and out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    # in chat too: the stop string ends the (reasoning) text
    chat_ref = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=48, temperature=0,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    text = chat_ref.choices[0].message.content
    stop = _clean_window(text, 2)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=48, temperature=0, stop=stop,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat.choices[0].message.content == text[:text.index(stop)].strip()
    assert chat.choices[0].finish_reason == "stop"


def test_n_choices_and_seed(client):
    kwargs = dict(messages=HELLO, max_tokens=10, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(model=MODEL_NAME, **kwargs)
    b = client.chat.completions.create(model=MODEL_NAME, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.reasoning_content for c in a.choices]
    assert texts == [c.message.reasoning_content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice draws its own tokens
    assert a.usage.completion_tokens == 30
    streamed = _stream_chat(client, **kwargs)
    assert [c["reasoning"] for c in streamed["choices"]] == texts


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens == 6
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and isinstance(e.bytes, list)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = _stream_chat(client, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    got = streamed["choices"][0]["logprobs"]
    assert [(e.token, e.bytes) for e in got] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in entries])
    plain = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_include_usage_in_stream(client):
    result = _stream_chat(client, messages=HELLO, max_tokens=5, temperature=0,
                          stream_options={"include_usage": True}, n=2)
    assert result["usage"].completion_tokens == 10 and result["usage"].prompt_tokens > 0


def test_max_completion_tokens(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_all_sampling_parameters_are_accepted(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=4, temperature=0.8, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.2, seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_completions_endpoint(client):
    full = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0,
                                     logprobs=2)
    c = full.choices[0]
    assert full.object == "text_completion" and full.usage.completion_tokens == 12
    assert len(c.logprobs.tokens) == 12 and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert "".join(c.logprobs.tokens).encode("utf-8", "replace")  # strings, one per token
    streamed, finish = "", None
    for chunk in client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12,
                                           temperature=0, stream=True):
        streamed += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert streamed == c.text and finish == c.finish_reason == "length"
    # token ids in, same answer
    ids = list(b"Once upon a time")
    assert client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0).choices[0].text \
        == c.text


def test_tool_choice_named_returns_a_call(client):
    kwargs = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, SEARCH],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=30,
                  temperature=0)
    out = client.chat.completions.create(model=MODEL_NAME, **kwargs)
    choice = out.choices[0]
    # the prefilled "<tool_call>\n<function=get_weather>\n" makes a call whatever the random model adds
    assert choice.finish_reason in ("tool_calls", "length")
    assert len(choice.message.tool_calls) == 1 and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)  # a JSON string, as OpenAI sends it
    streamed = _stream_chat(client, **kwargs)["choices"][0]
    (only,) = streamed["calls"].values()
    assert (only["name"], only["arguments"]) == (call.function.name, call.function.arguments)
    assert only["id"].startswith("call_") and streamed["finish"] == choice.finish_reason
    assert streamed["content"] == "" and streamed["reasoning"] == ""


def test_tool_choice_required(client):
    # a single tool: the name is prefilled, so the answer is a call
    one = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, tools=[SEARCH], tool_choice="required",
                                         max_tokens=20, temperature=0)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["search"]
    # several tools: the model writes the name; random output names no tool, so it comes back as content
    many = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, tools=[WEATHER, SEARCH],
                                          tool_choice="required", max_tokens=20, temperature=0)
    message = many.choices[0].message
    assert message.tool_calls or message.content.startswith("<tool_call>\n<function=")


def test_tool_choice_none_and_auto(client):
    auto = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, tools=[WEATHER], max_tokens=8,
                                          temperature=0)
    none = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=8, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens  # tools not rendered
    assert none.choices[0].message.tool_calls is None


def test_tool_loop_history_is_accepted(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "zip": "75001"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=4,
                                         temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
