"""The OpenAI-compatible HTTP API on top of :class:`~qwen35.engine.AsyncLLM`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streamed as server-sent events on
request), ``GET /v1/models``, ``GET /health``, ``GET /metrics``; ``GET /`` is a chat page (static/chat.*) for a browser.

Error policy: whatever a client sends, the answer is a JSON body ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status that says what to fix (400 for a malformed or invalid request, 401 for a missing or wrong API
key, 404 for an unknown model or path, 413 for a body over the limit); 500 is reserved for bugs of the server.
Malformed model output (a broken tool call) is not an error: it comes back as content.

Disconnects: a request whose client went away is aborted at once, which frees its cache.  Streaming responses
watch the connection for the whole response; non-streaming ones poll it while the engine works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat.completion import (
    ChatDelta,
    ChatPrompt,
    ChatStreamProcessor,
    build_chat_prompt,
    chat_finish_reason,
    chat_result,
)
from ..chat.media import IMAGE_TOKEN, VIDEO_TOKEN, MediaError
from ..chat.vision_prompt import VisionPreparer, media_parts
from ..engine.llm_engine import CompletionOutput, RequestOutput
from ..engine.multimodal import VisionInput
from ..engine.params import SamplingParams, sampling_defaults
from ..llm import no_vision_reason
from .metrics import RequestTimer, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    APIError,
    sampling_params,
)

log = logging.getLogger("qwen35.serve")
access_log = logging.getLogger("qwen35.access")  # one line per generation request, with its timings

DEFAULT_MAX_BODY_BYTES = 16 * 2 ** 20
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there
LOGPROB_FLOOR = -9999.0  # stands for -inf, which JSON cannot carry

# Fields named at the start of the messages of build_chat_prompt / validate_messages / validate_tools.
_CHAT_FIELDS = ("messages", "tools", "tool_choice", "chat_template_kwargs", "enable_thinking", "parallel_tool_calls")
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|.*\[.*\])$")
# A MediaError's message starts with the content part it is about (qwen35.chat.vision_prompt): OpenAI's error.param.
_MEDIA_PART = re.compile(r"^(messages\[\d+\]\.content\[\d+\])")


# =============================================================================================
# errors


def _error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, status, param, code), status_code=status)


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """One readable line naming the fields at fault (pydantic's union branches collapsed)."""
    parts: list[str] = []
    first_param: str | None = None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = str(err.get("msg", "")).removeprefix("Invalid JSON: ")
            return f"the body is not valid JSON: {detail}", None
        loc = [p for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]
        path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err.get("type") == "extra_forbidden":
            text = f"{path}: unknown field (not supported by this server)"
        elif err.get("type") == "model_type" and not path:
            text = "the body must be a JSON object"
        else:
            text = f"{path}: {err.get('msg', 'invalid value')}" if path else str(err.get("msg", "invalid body"))
        if text not in parts:
            parts.append(text)
        if first_param is None and loc:
            first_param = str(loc[0])
    return "invalid request: " + "; ".join(parts[:4]), first_param


def _media_param(message: str) -> str:
    found = _MEDIA_PART.match(message)
    return found.group(1) if found else "messages"  # e.g. placeholders typed into the text that match no picture


def _chat_param(message: str) -> str:
    for name in _CHAT_FIELDS:
        if message.startswith(name):
            return name
    return "messages"  # the template's own complaints are about the conversation


# =============================================================================================
# streaming plumbing


class _EventStream(StreamingResponse):
    """Server-sent events that stop (and close their generator, which aborts the request) when the client goes.

    Starlette watches for the disconnect only under older ASGI versions and otherwise learns of it when a write
    fails, which for a request waiting for its turn may be a long time; this always watches, and always closes
    the generator rather than leaving it to the garbage collector.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with suppress(OSError):  # the connection broke mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def _stream_error(exc: Exception) -> str:
    """The error event for a failure after a stream began: the engine refused the request (ValueError), failed a
    step (RuntimeError), or a bug."""
    if isinstance(exc, ValueError):
        return _sse(_error_body(str(exc), 400))
    if isinstance(exc, RuntimeError):
        log.error("a streamed request failed: %s", exc)
        return _sse(_error_body(f"generation failed: {exc}", 500, code="engine_error"))
    log.exception("internal error while streaming")
    return _sse(_error_body(f"internal server error: {type(exc).__name__}", 500))


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    return value if math.isfinite(value) else LOGPROB_FLOOR


class _TokenText:
    """Text and raw bytes of single tokens, for logprobs (a token may be part of a multi-byte character)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        table = getattr(tokenizer, "_token_bytes", None)
        self._bytes: list[bytes] | None = table() if callable(table) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            if self._bytes is not None and 0 <= token_id < len(self._bytes):
                raw = self._bytes[token_id]
                text = raw.decode("utf-8", errors="replace")
            else:
                text = self._tok.decode([token_id])
                raw = text.encode("utf-8")
            hit = self._cache[token_id] = (text, list(raw))
        return hit


# =============================================================================================
# the chat page

_STATIC_TYPES = {"chat.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                 "chat.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere (it must work offline) and runs only its own script; saying so in a policy
# also keeps model output from ever running as code, were it put into the page as HTML by mistake.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _static_response(name: str) -> Response:
    """A file of qwen35/serve/static named in _STATIC_TYPES (so never a path a client chose)."""
    from importlib.resources import files

    try:
        body = (files(__package__) / "static" / name).read_bytes()
    except OSError:  # an install without the package data
        raise APIError(f"the chat page ({name}) is not installed with this package", status=404) from None
    return Response(body, media_type=_STATIC_TYPES[name], headers=_PAGE_HEADERS)


# =============================================================================================
# the app


def create_app(async_llm: Any, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_tokens_cap: int | None = None,
               vision: VisionPreparer | None = None) -> FastAPI:
    """A FastAPI app serving ``async_llm`` (an :class:`~qwen35.engine.AsyncLLM`) under the name ``model_name``.

    ``api_key``: if set, /v1/* requests need ``Authorization: Bearer <api_key>`` (/health and /metrics stay open).
    ``max_body_bytes``: larger request bodies get 413.  ``max_tokens_cap``: the most tokens one choice may ask
    for, and what it gets when it asks for no limit (default: the engine's context length).
    ``vision``: loads and preprocesses the images and videos of chat requests, under its ``MediaPolicy`` (where
    pictures may come from, how large they may be): ``LLM.vision_preparer()`` of a model with a vision tower.
    Without it every image / video content part is answered 400, naming why.
    The app does not own the engine: shutting the engine down is the caller's business (see :func:`serve`).
    """
    return _Server(async_llm, model_name, api_key, max_body_bytes, max_tokens_cap, vision).app


class _Server:
    def __init__(self, async_llm: Any, model_name: str, api_key: str | None, max_body_bytes: int,
                 max_tokens_cap: int | None, vision: VisionPreparer | None = None) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.llm = async_llm
        self.tokenizer = async_llm.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_model_len: int = async_llm.engine.max_model_len
        self.vocab_size: int = async_llm.engine.model.config.text.vocab_size
        self.max_tokens_cap = max_tokens_cap or self.max_model_len
        self.defaults = sampling_defaults(getattr(self.tokenizer, "generation_config", None) or {})
        self.token_text = _TokenText(self.tokenizer)
        self.vision = vision
        # what a picture part gets when there is no preparer: the model's own reason, else the server's
        self.no_vision = None if vision is not None else (
            no_vision_reason(async_llm.engine.model)
            or "this server takes no images or videos (it was started without a vision preparer)")
        self.metrics = ServerMetrics(async_llm)
        self.created = int(time.time())
        self.app = self._build()

    # ------------------------------------------------------------------ routes

    def _build(self) -> FastAPI:
        app = FastAPI(title="qwen35", description="OpenAI-compatible API for Qwen3.5 models", version="1")
        auth = [Depends(self._check_auth)]
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=auth)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=auth)
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=auth)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"])
        # the chat page needs no key: it holds no secrets, and the API calls it makes carry the key
        app.add_api_route("/", self.chat_page, methods=["GET"], include_in_schema=False)
        app.add_api_route("/static/{name}", self.static_file, methods=["GET"], include_in_schema=False)

        app.openapi = lambda: _openapi_document(app, self.model_name)  # type: ignore[method-assign]

        app.add_exception_handler(APIError, self._on_request_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, self._on_validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, self._on_http_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, self._on_bug)
        paths = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/",
                 *(f"/static/{name}" for name in _STATIC_TYPES)}
        app.add_middleware(_CountRequests, metrics=self.metrics, paths=paths)
        return app

    async def _on_request_error(self, request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.message, exc.status, exc.param, exc.code)

    async def _on_validation_error(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)  # FastAPI answers 422; OpenAI clients expect 400
        return _error_response(message, 400, param)

    async def _on_http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return _error_response(message, exc.status_code)

    async def _on_bug(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(f"internal server error: {type(exc).__name__}", 500)

    async def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           status=401, code="invalid_api_key")

    async def health(self) -> JSONResponse:
        thread = getattr(self.llm, "_thread", None)  # the engine loop; if it died nothing will be served
        if thread is not None and not thread.is_alive():
            return _error_response("the engine thread is not running", 503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    def chat_page(self) -> Response:  # plain def: FastAPI reads the file in its thread pool
        return _static_response("chat.html")

    def static_file(self, name: str) -> Response:
        if name not in _STATIC_TYPES:
            raise APIError(f"no such file: /static/{name}", status=404)
        return _static_response(name)

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "qwen35",
            "max_model_len": self.max_model_len}]})

    # ------------------------------------------------------------------ request helpers

    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        """Read and validate a JSON body, refusing oversized bodies before reading them whole."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError("invalid Content-Length header")
            if int(declared) > self.max_body_bytes:
                raise APIError(f"the body has {declared} bytes, over this server's limit of "
                               f"{self.max_body_bytes} bytes", status=413, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(f"the body is larger than this server's limit of {self.max_body_bytes} bytes",
                               status=413, code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise APIError("the body is empty; send a JSON object")
        try:
            parsed = model.model_validate_json(body, strict=True)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(message, param) from None
        requested = getattr(parsed, "model", None)
        if requested is not None and requested != self.model_name:
            raise APIError(f"the model '{requested}' does not exist; this server serves '{self.model_name}'",
                           "model", status=404, code="model_not_found")
        return parsed

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        # The engine checks the same on admission, but by then a streamed response has already begun with 200.
        if not ids:
            raise APIError("the prompt is empty", param)
        if len(ids) >= self.max_model_len:
            raise APIError(f"the prompt has {len(ids)} tokens but this server's context holds "
                           f"{self.max_model_len} (prompt + at least one generated token); shorten it",
                           param, code="context_length_exceeded")
        return ids

    async def _generate(self, ids: list[int], params: SamplingParams, request_id: str,
                        vision: VisionInput | None = None) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, counted and timed in the metrics, with one access-log line."""
        admitted = False
        endpoint = "/v1/chat/completions" if request_id.startswith("chatcmpl-") else "/v1/completions"
        timer = RequestTimer(self.metrics, request_id, endpoint)
        status = "error"
        async with aclosing(self.llm.generate(ids, params, request_id, vision=vision)) as stream:
            try:
                async for out in stream:
                    if not admitted:
                        self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                        admitted = True
                    self.metrics.generation_tokens.inc(sum(len(o.delta_token_ids) for o in out.outputs))
                    timer.output(out)
                    if out.finished:
                        status = "ok"
                    yield out
                    if out.finished:
                        return
            except (asyncio.CancelledError, GeneratorExit):
                self.metrics.aborted.inc()
                status = "aborted"
                raise
            finally:
                access_log.info("%s", timer.end(status))

    async def _final_output(self, request: Request, ids: list[int], params: SamplingParams,
                            request_id: str, vision: VisionInput | None = None) -> RequestOutput | None:
        """Run a request to the end; None if the client disconnected first (the request is then aborted)."""
        async def run() -> RequestOutput | None:
            last = None
            async with aclosing(self._generate(ids, params, request_id, vision)) as stream:
                async for out in stream:
                    last = out
            return last

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                    return None
        finally:
            if not task.done():  # this handler was cancelled (server shutdown)
                task.cancel()
        try:
            return task.result()
        except ValueError as e:  # the engine refused the request
            raise APIError(str(e)) from None
        except RuntimeError as e:  # an engine step failed; the engine thread goes on serving
            log.error("request %s failed: %s", request_id, e)
            raise APIError(f"generation failed: {e}", status=500, code="engine_error") from None

    def _usage(self, prompt_tokens: int, outputs: list[CompletionOutput], cached: int = 0) -> dict[str, Any]:
        """OpenAI's usage object; ``cached`` prompt tokens came from the prefix cache (prompt_tokens_details)."""
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    # ------------------------------------------------------------------ /v1/chat/completions

    def _pictures(self, text: str, messages: list[Any]) -> tuple[str, VisionInput | None]:
        """The rendered prompt with its picture placeholders expanded, and the pictures' tensors (None for a
        prompt without pictures).  Runs on a worker thread: reading, fetching and decoding take a while."""
        parts = media_parts(messages)
        if not parts and (self.vision is None or (IMAGE_TOKEN not in text and VIDEO_TOKEN not in text)):
            return text, None
        if self.vision is None:
            self.metrics.media.labels(parts[0].kind, "refused").inc()
            raise APIError(f"{parts[0].where}: {self.no_vision}", parts[0].where)
        try:
            prepared = self.vision.prepare(text, parts)
        except MediaError as e:
            where = _media_param(str(e))
            refused = next((p for p in parts if p.where == where), parts[0] if parts else None)
            if refused is not None:  # (None: placeholders typed into the text, no picture sent)
                self.metrics.media.labels(refused.kind, "refused").inc()
            raise
        for part in parts:
            self.metrics.media.labels(part.kind, "accepted").inc()
        return prepared.text, VisionInput(**prepared.tensors())

    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self._read(request, ChatCompletionRequest)
        kwargs = dict(req.chat_template_kwargs or {})

        def prepare() -> tuple[ChatPrompt, list[int], VisionInput | None]:
            prompt = build_chat_prompt(self.tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                       enable_thinking=req.enable_thinking, chat_template_kwargs=kwargs,
                                       parallel_tool_calls=req.parallel_tool_calls,
                                       response_format=req.response_format)
            text, vision = self._pictures(prompt.text, req.messages)
            return prompt, self.tokenizer.encode(text), vision

        try:  # rendering, tokenising and loading pictures take a while: keep the event loop free
            prompt, ids, vision = await asyncio.to_thread(prepare)
        except APIError:
            raise
        except MediaError as e:  # a picture that cannot be used, or may not be read: its part is the param
            raise APIError(str(e), _media_param(str(e))) from None
        except ValueError as e:
            message = str(e)
            raise APIError(message, "response_format" if message.startswith("response_format")
                           else _chat_param(message)) from None
        base = sampling_params(req, self.defaults, self.max_tokens_cap)
        try:
            params = prompt.sampling_params(base)
        except ValueError as e:  # the grammar spec of response_format / a forced call
            raise APIError(str(e), prompt.structured_source) from None
        self._check_prompt(ids, "messages")
        engine = getattr(self.llm, "engine", None)
        if params.structured is not None and engine is not None:
            # Compile the grammar here (the engine caches it): a schema it cannot enforce, or a server without
            # llguidance, is a 400 naming the field, not an error inside a stream that has already begun.
            try:
                await asyncio.to_thread(engine.check_structured, params)
            except ValueError as e:
                raise APIError(str(e), prompt.structured_source) from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return _EventStream(self._chat_stream(req, prompt, ids, params, request_id, created, vision),
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        out = await self._final_output(request, ids, params, request_id, vision)
        if out is None:
            return Response(status_code=499)  # client closed the request (nobody reads this)
        result = chat_result(prompt, out)
        choices = []
        for choice, o in zip(result.choices, out.outputs):
            # reasoning under both names: clients read one or the other (null when thinking is off)
            message: dict[str, Any] = {"role": "assistant", "content": choice.content,
                                       "reasoning_content": choice.reasoning, "reasoning": choice.reasoning}
            if choice.tool_calls:
                message["tool_calls"] = [call.to_openai() for call in choice.tool_calls]
            choices.append({"index": choice.index, "message": message,
                            "logprobs": self._chat_logprobs(o.token_ids, o) if req.logprobs else None,
                            "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                             "model": self.model_name, "choices": choices, "system_fingerprint": None,
                             "usage": self._usage(len(out.prompt_token_ids), out.outputs, out.num_cached_tokens)})

    def _chat_logprobs(self, token_ids: list[int], o: CompletionOutput, start: int = 0) -> dict[str, Any]:
        """OpenAI chat logprobs of ``token_ids``, the tokens of ``o`` from position ``start`` on."""
        entries = []
        for k, tid in enumerate(token_ids):
            i = start + k
            text, raw = self.token_text(tid)
            top = (o.top_logprobs[i] if o.top_logprobs and i < len(o.top_logprobs) else None) or []
            lp = o.logprobs[i] if o.logprobs and i < len(o.logprobs) else None
            entries.append({"token": text, "logprob": _finite(lp), "bytes": raw, "top_logprobs": [
                {"token": self.token_text(t)[0], "logprob": _finite(v), "bytes": self.token_text(t)[1]}
                for t, v in top]})
        return {"content": entries}

    async def _chat_stream(self, req: ChatCompletionRequest, prompt: ChatPrompt, ids: list[int],
                           params: SamplingParams, request_id: str, created: int,
                           vision: VisionInput | None = None) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        n = params.n
        processors = [ChatStreamProcessor(prompt) for _ in range(n)]
        done = [False] * n
        pending_logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        last: RequestOutput | None = None

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                  stop_reason: Any = None) -> str:
            body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name, "choices": [{
                                        "index": index, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}]}
            if finish_reason is not None:
                body["choices"][0]["stop_reason"] = stop_reason
            if req.logprobs and pending_logprobs[index]:
                body["choices"][0]["logprobs"] = {"content": pending_logprobs[index]}
                pending_logprobs[index] = []
            if include_usage:
                body["usage"] = (self._usage(len(ids), last.outputs, last.num_cached_tokens) if continuous_usage and last
                                 else None)
            return _sse(body)

        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async with aclosing(self._generate(ids, params, request_id, vision)) as stream:
                async for out in stream:
                    last = out
                    for o in out.outputs:
                        i = o.index
                        if done[i]:
                            continue
                        if req.logprobs and o.delta_token_ids:
                            start = len(o.token_ids) - len(o.delta_token_ids)
                            pending_logprobs[i] += self._chat_logprobs(o.delta_token_ids, o, start)["content"]
                        delta = processors[i].feed(o.delta_text)
                        if o.finished:
                            delta += processors[i].finish()
                        for piece in _delta_pieces(delta):
                            yield chunk(i, piece)
                        if o.finished:
                            done[i] = True
                            reason = chat_finish_reason(o.finish_reason, bool(processors[i].calls))
                            yield chunk(i, {}, reason, o.stop_reason)
            if include_usage and last is not None:
                yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [],
                            "usage": self._usage(len(last.prompt_token_ids), last.outputs, last.num_cached_tokens)})
        except Exception as e:  # the 200 is already sent: report in the stream, as OpenAI does
            yield _stream_error(e)
        yield _sse("[DONE]")

    # ------------------------------------------------------------------ /v1/completions

    def _completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                               "prompt")
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise APIError("batched prompts are not supported: send one request per prompt", "prompt")
        raise APIError("prompt must be a string or a list of token ids", "prompt")

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self._read(request, CompletionRequest)
        params = sampling_params(req, self.defaults, self.max_tokens_cap)
        ids = self._check_prompt(await asyncio.to_thread(self._completion_prompt, req.prompt), "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return _EventStream(self._completion_stream(req, ids, params, request_id, created),
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = await self._final_output(request, ids, params, request_id)
        if out is None:
            return Response(status_code=499)
        choices = [{"index": o.index, "text": o.text,
                    "logprobs": self._completion_logprobs(o.token_ids, o) if req.logprobs is not None else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for o in out.outputs]
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                             "model": self.model_name, "choices": choices, "system_fingerprint": None,
                             "usage": self._usage(len(out.prompt_token_ids), out.outputs, out.num_cached_tokens)})

    def _completion_logprobs(self, token_ids: list[int], o: CompletionOutput, start: int = 0,
                             offset: int = 0) -> dict[str, Any]:
        """The legacy completions logprobs object; ``offset`` is the text length before these tokens."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for k, tid in enumerate(token_ids):
            i = start + k
            text = self.token_text(tid)[0]
            tokens.append(text)
            token_lps.append(_finite(o.logprobs[i]) if o.logprobs and i < len(o.logprobs) else None)
            top = (o.top_logprobs[i] if o.top_logprobs and i < len(o.top_logprobs) else None) or []
            tops.append({self.token_text(t)[0]: _finite(v) for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(self, req: CompletionRequest, ids: list[int], params: SamplingParams,
                                 request_id: str, created: int) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n = params.n
        done = [False] * n
        offsets = [0] * n

        def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None = None,
                  stop_reason: Any = None) -> str:
            body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                    "model": self.model_name, "choices": [{
                                        "index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish_reason, "stop_reason": stop_reason}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        last: RequestOutput | None = None
        try:
            async with aclosing(self._generate(ids, params, request_id)) as stream:
                async for out in stream:
                    last = out
                    for o in out.outputs:
                        i = o.index
                        if done[i] or not (o.delta_text or o.delta_token_ids or o.finished):
                            continue
                        logprobs = None
                        if req.logprobs is not None:
                            start = len(o.token_ids) - len(o.delta_token_ids)
                            logprobs = self._completion_logprobs(o.delta_token_ids, o, start, offsets[i])
                        offsets[i] += len(o.delta_text)
                        done[i] = o.finished
                        yield chunk(i, o.delta_text, logprobs, o.finish_reason, o.stop_reason)
            if include_usage and last is not None:
                yield _sse({"id": request_id, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": [],
                            "usage": self._usage(len(last.prompt_token_ids), last.outputs, last.num_cached_tokens)})
        except Exception as e:  # the 200 is already sent: report in the stream, as OpenAI does
            yield _stream_error(e)
        yield _sse("[DONE]")


# =============================================================================================
# the API description

_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERROR_STATUSES = {"400": "The request is malformed or invalid; the message names the field.",
                   "401": "Missing or wrong API key (when the server has one).",
                   "404": "Unknown model name.", "413": "The body is larger than the server's limit.",
                   "500": "A bug of the server or a failed engine step; the server keeps running."}
_BODIES = {"/v1/chat/completions": (ChatCompletionRequest, "A chat completion, or server-sent events of "
                                    "chat.completion.chunk objects when stream is true."),
           "/v1/completions": (CompletionRequest, "A text completion, or server-sent events when stream is true.")}


# What the handlers check by hand (the pydantic models take these fields as Any so that every malformed shape gets
# one readable message), written out for clients and schema-driven tools.
_MEDIA_URL = {"type": "string", "description": "a data: URL (always accepted); a file path or file:// URL inside "
               "the server's --allowed-local-media-path; an http(s) URL with --allow-remote-media"}
_CONTENT_PART_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"},
                                                                     "text": {"type": "string"}}},
    *({"type": "object", "required": ["type", key], "properties": {"type": {"const": key}, key: {"anyOf": [
        _MEDIA_URL, {"type": "object", "required": ["url"], "properties": {"url": _MEDIA_URL}}]}}}
      for key in ("image_url", "video_url")),
    {"type": "object", "required": ["type"], "description": "transformers' form of a picture part",
     "properties": {"type": {"enum": ["image", "video"]}, "image": _MEDIA_URL, "video": _MEDIA_URL,
                    "url": _MEDIA_URL, "path": _MEDIA_URL}}]}
_MESSAGE_SCHEMA = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": _CONTENT_PART_SCHEMA}]},
    "reasoning_content": {"type": "string"}, "name": {"type": "string"}, "tool_call_id": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object"}}}}
_TOOL_SCHEMA = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.:\\-]{1,128}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}}}}}
_RESPONSE_FORMAT_SCHEMA = {"anyOf": [
    {"type": "null"},
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"}, "json_schema": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
            "strict": {"type": ["boolean", "null"]}}}}}]}
_STOP_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}


def _openapi_document(app: FastAPI, model_name: str) -> dict[str, Any]:
    """FastAPI's document plus what it cannot see: the handlers read their bodies themselves (to enforce the size
    limit before parsing and to answer 400 in OpenAI's error shape), so the request schemas and the error
    responses are added here from the same pydantic models the handlers validate with."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = _ERROR_SCHEMA
    errors = {code: {"description": text, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for code, text in _ERROR_STATUSES.items()}
    for path, (model, answer) in _BODIES.items():
        operation = doc["paths"][path]["post"]
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        props = body["properties"]
        props["model"] = {"anyOf": [{"type": "string", "enum": [model_name]}, {"type": "null"}],
                          "description": "the served model (other names get 404)"}
        props["stop"] = _STOP_SCHEMA
        if "messages" in props:
            props["messages"] = {"type": "array", "items": _MESSAGE_SCHEMA, "minItems": 1}
            props["tools"] = {"anyOf": [{"type": "array", "items": _TOOL_SCHEMA}, {"type": "null"}]}
            props["response_format"] = _RESPONSE_FORMAT_SCHEMA
        if "prompt" in props:
            props["prompt"] = _PROMPT_SCHEMA
        schemas[model.__name__] = body
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        operation["responses"] = {"200": {"description": answer, "content": {
            "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}},
            **errors}
    doc["paths"]["/v1/models"]["get"]["responses"].update({"401": errors["401"]})
    doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain": {"schema": {"type": "string", "description": "Prometheus exposition format"}}}
    app.openapi_schema = doc
    return doc


def _delta_pieces(delta: ChatDelta) -> list[dict[str, Any]]:
    """The chunks' ``delta`` objects for one step: reasoning, then content, then tool calls, one kind per chunk
    (clients often read only the first field they find)."""
    pieces: list[dict[str, Any]] = []
    if delta.reasoning:
        pieces.append({"reasoning_content": delta.reasoning, "reasoning": delta.reasoning})
    if delta.content:
        pieces.append({"content": delta.content})
    if delta.tool_calls:
        merged: list[dict[str, Any]] = []
        for piece in delta.tool_calls:
            entry = piece.to_openai()
            if merged and merged[-1]["index"] == piece.index and piece.id is None:
                merged[-1]["function"]["arguments"] += piece.arguments  # one entry per call and chunk
            else:
                merged.append(entry)
        pieces.append({"tool_calls": merged})
    return pieces


class _CountRequests:
    """ASGI middleware counting requests by endpoint and final status (streams count with the status they began
    with).  Unknown paths are counted together so that a scanner cannot blow up the label set."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics, paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in self.paths else "other", str(status)).inc()
