"""LLM.chat (the offline API over the same completion logic as the server) and the `qwen35 serve` command."""

from __future__ import annotations

import json

import pytest

import qwen35
from qwen35 import SamplingParams
from qwen35.chat import split_reasoning
from qwen35.cli import main

from .test_openai_api import HELLO, SEARCH, WEATHER


@pytest.fixture(scope="module")
def chat_llm(checkpoint):
    # its own engine: the session's server drives the other one from its thread
    return qwen35.LLM(checkpoint, dtype="float32", max_num_seqs=8)


def test_chat_matches_generate_on_the_rendered_prompt(chat_llm):
    params = SamplingParams(temperature=0, max_tokens=20)
    result = chat_llm.chat(HELLO, params)
    prompt = chat_llm.tokenizer.apply_chat_template(HELLO)
    raw = chat_llm.generate(prompt, params)[0]
    assert result.prompt == prompt and result.token_ids == raw.outputs[0].token_ids
    assert (result.reasoning or "", result.content) == split_reasoning(raw.outputs[0].text)
    assert result.finish_reason == raw.outputs[0].finish_reason
    assert result.usage == {"prompt_tokens": len(raw.prompt_token_ids), "completion_tokens": 20,
                            "total_tokens": len(raw.prompt_token_ids) + 20}
    off = chat_llm.chat(HELLO, params, enable_thinking=False)
    assert off.reasoning is None and off.prompt.endswith("<think>\n\n</think>\n\n")


def test_chat_n_and_batch(chat_llm):
    result = chat_llm.chat(HELLO, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6))
    assert [c.index for c in result.choices] == [0, 1] and result.usage["completion_tokens"] == 12
    batch = chat_llm.chat([HELLO, [{"role": "user", "content": "Bye"}]], SamplingParams(temperature=0, max_tokens=4))
    assert isinstance(batch, list) and len(batch) == 2 and batch[0].prompt != batch[1].prompt


def test_chat_named_tool_call_and_the_next_turn(chat_llm):
    params = SamplingParams(temperature=0, max_tokens=20)
    result = chat_llm.chat([{"role": "user", "content": "Weather in Oslo?"}], params, tools=[WEATHER, SEARCH],
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = result.tool_calls
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
    assert result.finish_reason in ("tool_calls", "length") and result.content is None
    history = [{"role": "user", "content": "Weather in Oslo?"}, result.message,
               {"role": "tool", "tool_call_id": call.id, "content": "rain"}]
    again = chat_llm.chat(history, params, tools=[WEATHER, SEARCH])
    assert "<function=get_weather>" in again.prompt and "<tool_response>\nrain" in again.prompt


def test_chat_rejects_bad_input(chat_llm):
    with pytest.raises(ValueError, match="not in tools"):
        chat_llm.chat(HELLO, tools=[SEARCH], tool_choice={"type": "function", "function": {"name": "x"}})
    with pytest.raises(ValueError, match="role"):
        chat_llm.chat([{"role": "robot", "content": "hi"}])


def test_serve_command_help_and_arguments(capsys, monkeypatch):
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--model", "--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs",
                   "--cache-memory", "--dtype", "127.0.0.1"):
        assert option in text
    seen = {}
    import qwen35.serve as serve_pkg
    monkeypatch.setattr(serve_pkg, "serve", lambda model, **kw: seen.update(kw, model=model))
    assert main(["serve", "--model", "/x", "--port", "9001", "--api-key", "k", "--served-model-name", "m",
                 "--max-num-seqs", "4", "--cache-memory", "1GiB", "--dtype", "float32"]) == 0
    assert seen["model"] == "/x" and seen["port"] == 9001 and seen["host"] == "127.0.0.1"
    assert (seen["api_key"], seen["served_model_name"], seen["max_num_seqs"]) == ("k", "m", 4)
    assert (seen["cache_memory"], seen["dtype"]) == ("1GiB", "float32")
    assert main(["serve", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
