"""Request bodies of the OpenAI-compatible API, and their translation into engine sampling parameters.

Bodies are validated strictly (JSON types as sent: ``"n": "2"`` or ``"stream": 1`` are errors, not coerced),
and fields this server does not know are rejected rather than silently ignored: a misspelt ``max_token`` must not
quietly generate until the context is full.  Fields OpenAI defines that have no effect here (``user``,
``metadata``, ``store``...) are accepted and ignored; fields asking for something this server cannot do
(``logit_bias``, ``echo``...) are rejected with a message saying so.  ``response_format`` is checked by
build_chat_prompt (which names the field at fault) and enforced by grammar-constrained decoding.
Cross-field rules and value ranges that SamplingParams already checks are left to it, so there is one rule and
one message for each.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.params import MAX_LOGPROBS, SamplingParams

MAX_N = 64  # choices per request: each is a sequence with its own cache, so the count is capped


class APIError(ValueError):
    """An error answer: mostly a request the server refuses (4xx), ``param`` naming the field at fault (OpenAI's
    ``error.param``); also a request the engine failed (5xx)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk


class _SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Any = None  # a string or a list of strings: checked by SamplingParams, with one message for both
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, widely used with Qwen models
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # accepted, no effect here
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[Any]  # each message is checked by qwen35.chat.validate_messages (names index and field)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None  # checked by build_chat_prompt
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None  # alias of chat_template_kwargs.enable_thinking that some clients send
    response_format: Any = None  # checked by build_chat_prompt, so that every malformed shape gets one message
    reasoning_effort: str | None = None
    functions: list[Any] | None = None  # the pre-tools API
    function_call: Any = None


class CompletionRequest(_SamplingFields):
    prompt: Any  # a string or a list of token ids (or a one-element list of either)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def _unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Reject what a client asked for that this server cannot do, instead of ignoring it."""
    if req.logit_bias:
        raise APIError("logit_bias is not supported by this server", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.functions is not None or req.function_call is not None:
            raise APIError("functions / function_call are the deprecated form of tools / tool_choice; "
                           "send tools instead", "functions")
        if req.reasoning_effort is not None:
            raise APIError("reasoning_effort is not supported by the Qwen3.5 chat template; switch thinking "
                           "with chat_template_kwargs.enable_thinking", "reasoning_effort")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        if req.echo:
            raise APIError("echo is not supported by this server", "echo")
        if req.suffix:
            raise APIError("suffix is not supported by this server", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of is not supported by this server (only best_of == n)", "best_of")


def _param_of(message: str) -> str | None:
    # SamplingParams messages start with the field name ("temperature must be >= 0, got -1")
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


def sampling_params(req: ChatCompletionRequest | CompletionRequest, defaults: dict[str, Any],
                    max_tokens_cap: int) -> SamplingParams:
    """The engine's SamplingParams for a request.

    ``defaults`` are the checkpoint's recommended sampling settings (generation_config.json), used for what the
    request leaves out, as vLLM does.  ``max_tokens_cap`` bounds ``max_tokens`` (a larger value is an error, an
    absent one means the cap).
    """
    _unsupported(req)
    max_tokens = req.max_tokens
    field = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise APIError(f"{field} must be <= {max_tokens_cap} on this server, got {max_tokens}", field)
    if max_tokens is None:
        max_tokens = max_tokens_cap

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, temperature=pick("temperature", 1.0),
            top_k=pick("top_k", 0), top_p=pick("top_p", 1.0), min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0), presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0), seed=req.seed, stop=req.stop,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as e:
        raise APIError(str(e), _param_of(str(e))) from None
