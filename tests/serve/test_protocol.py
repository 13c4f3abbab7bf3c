"""Request bodies -> SamplingParams: checkpoint defaults, caps, and what is refused."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from qwen35.engine.params import sampling_defaults
from qwen35.serve.protocol import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    APIError,
    sampling_params,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def test_checkpoint_defaults_fill_what_the_request_leaves_out():
    defaults = sampling_defaults({"temperature": 0.6, "top_k": 20, "top_p": 0.95, "do_sample": True,
                                    "presence_penalty": "bad"})
    assert defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES, "top_p": 0.5})
    params = sampling_params(req, defaults, max_tokens_cap=100)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.6, 20, 0.5, 100)
    assert sampling_defaults({"do_sample": False})["temperature"] == 0.0


def test_chat_fields_map_to_sampling_params():
    req = ChatCompletionRequest.model_validate(dict(
        messages=MESSAGES, n=2, max_tokens=9, max_completion_tokens=7, temperature=0, stop="x", seed=3,
        logprobs=True, top_logprobs=4, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.1,
        presence_penalty=1.5, stop_token_ids=[5], ignore_eos=True, min_tokens=1))
    p = sampling_params(req, {}, 50)
    assert (p.n, p.max_tokens, p.temperature, p.stop, p.seed, p.logprobs) == (2, 7, 0, ("x",), 3, 4)
    assert (p.min_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (0.1, 1.2, 0.1, 1.5)
    assert (p.stop_token_ids, p.ignore_eos, p.min_tokens) == ((5,), True, 1)
    no_top = sampling_params(ChatCompletionRequest.model_validate(dict(messages=MESSAGES, logprobs=True)), {}, 50)
    assert no_top.logprobs == 0  # the chosen token's logprob only


def test_completion_defaults_and_refusals():
    assert sampling_params(CompletionRequest.model_validate({"prompt": "x"}), {}, 50).max_tokens == 16
    with pytest.raises(APIError, match="must be <= 50") as info:
        sampling_params(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 51}), {}, 50)
    assert info.value.param == "max_tokens" and info.value.status == 400
    with pytest.raises(APIError, match="min_tokens must be <= max_tokens") as info:
        sampling_params(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 2, "min_tokens": 3}), {}, 50)
    assert info.value.param == "min_tokens"
