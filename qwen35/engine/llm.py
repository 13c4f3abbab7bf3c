"""The Python API: ``LLM`` for scripts, ``AsyncLLM`` for servers.

    llm = qwen35.LLM("path/to/Qwen3.5-0.8B")
    out = llm.generate(["Hello"], qwen35.SamplingParams(max_tokens=32))[0]
    print(out.outputs[0].text)
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import torch

from .llm_engine import EngineConfig, LLMEngine, RequestOutput
from .params import SamplingParams

Prompt = str | list[int]
logger = logging.getLogger("qwen35.engine")


def parse_bytes(value: int | str | None) -> int | None:
    """'2GiB', '512MiB', '1.5GB', '300000000' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "tb": 10 ** 12, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "b": 1}
    low = s.lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            try:
                return int(float(low[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a memory size (e.g. '2GiB', '512MiB')") from None


def default_model_path() -> Path:
    """The model used when none is given: the embedded one if the package ships it, else the demo model."""
    from ..demo import embedded_model_path, ensure_demo_checkpoint

    return embedded_model_path() or ensure_demo_checkpoint()


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto", *,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512, block_size: int = 16,
                 cache_memory: int | str | None = None, max_model_len: int | None = None,
                 threads: int | None = None, quantization: str | None = None) -> None:
        from ..chat.tokenizer import Tokenizer
        from ..checkpoint import load_model
        from ..kernels.ops import check_switches

        check_switches()  # a bad QWEN35_CPU_BF16 / QWEN35_NATIVE_ISA fails here, not in the first forward
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        path = Path(model) if model is not None else default_model_path()
        self.model_path = path
        if quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
        self.model = load_model(path, dtype=dtype)
        if quantization == "int8":
            from ..quant import quantize_int8
            quantize_int8(self.model)
        self.tokenizer = Tokenizer(path)
        config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              block_size=block_size, cache_memory=parse_bytes(cache_memory),
                              max_model_len=max_model_len)
        self.engine = LLMEngine(self.model, self.tokenizer, config)

    # -- batch ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion (continuously batched); one RequestOutput per prompt, in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        plist: list[Prompt] = [prompts] if single else list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or SamplingParams()] * len(plist)
        else:
            params_list = list(params)
            if len(params_list) != len(plist):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(plist)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(plist, params_list)]
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]

    # -- chat -----------------------------------------------------------------------------------------------
    def chat(self, messages, params: SamplingParams | None = None, tools=None, tool_choice="auto",
             enable_thinking: bool | None = None, chat_template_kwargs=None, parallel_tool_calls: bool = True,
             use_tqdm: bool = False):
        """Answer a conversation (OpenAI-style messages) through the chat template.

        Returns a :class:`~qwen35.chat.completion.ChatResult`: ``reasoning`` (the thinking), ``content``,
        ``tool_calls`` (parsed from Qwen's XML calls, arguments as JSON text), ``finish_reason``, ``token_ids``,
        ``usage``, ``message`` (to append to the history), and ``choices`` for ``params.n > 1``.  A list of
        conversations gives a list of results, generated as one batch.  ``tool_choice`` is "auto", "none",
        "required" or ``{"type": "function", "function": {"name": ...}}``; "required" and a named function are
        forced by prefilling the start of a call (see qwen35/chat/completion.py).  Thinking is on unless
        ``enable_thinking=False`` (or ``chat_template_kwargs={"enable_thinking": False}``).
        """
        from ..chat.completion import chat

        return chat(self, messages, params, tools=tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
                    chat_template_kwargs=chat_template_kwargs, parallel_tool_calls=parallel_tool_calls,
                    use_tqdm=use_tqdm)

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each step this request produced tokens; ``outputs[i].delta_text`` is the new
        text (always whole UTF-8 characters), and the deltas concatenate to the final text."""
        rid = self.engine.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)


class AsyncLLM:
    """Drives an LLMEngine on a background thread; coroutines add, stream and abort requests.

    The engine is touched only by its thread: requests and aborts cross over through a queue, outputs come
    back through each request's asyncio queue.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qwen35-engine", daemon=True)
        self._thread.start()
        self.errors = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; leaving the iterator early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()
        # The id is fixed here, not by the engine, so that a caller cancelled before admission can still abort.
        request_id = request_id if request_id is not None else f"async-{uuid.uuid4().hex}"
        self._inbox.put(("add", prompt, params, request_id, loop, q, done))
        self._wake.set()
        try:
            rid = await done  # raises the engine's ValueError for a bad request
        except asyncio.CancelledError:
            self.abort(request_id)  # queued after the add, so it finds the request admitted (or unknown)
            raise
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def stats(self) -> dict[str, int]:
        s = dict(self.engine.cache.usage())
        s["running"] = len(self.engine.scheduler.running)
        s["waiting"] = len(self.engine.scheduler.waiting)
        return s

    # -- engine thread ---------------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, prompt, params, rid, loop, q, done = msg
                try:
                    rid = self.engine.add_request(prompt, params, rid)
                except (ValueError, TypeError) as e:
                    _notify(loop, _settle, done, None, e)
                    continue
                self._streams[rid] = (loop, q)
                if not _notify(loop, _settle, done, rid, None):  # the caller's loop is gone: nobody listens
                    self.engine.abort(rid)
                    self._streams.pop(rid, None)
            else:
                rid = msg[1]
                self.engine.abort(rid)
                self._streams.pop(rid, None)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must not kill the server: fail the running requests, keep serving
                self.errors += 1
                logger.exception("engine step failed; failing the running requests")
                for rid, (loop, q) in list(self._streams.items()):
                    self.engine.abort(rid)
                    _notify(loop, q.put_nowait, RuntimeError(f"engine step failed: {e!r}"))
                self._streams.clear()
                continue
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is None:
                    continue
                loop, q = target
                if not _notify(loop, q.put_nowait, out):
                    self.engine.abort(out.request_id)
                    self._streams.pop(out.request_id, None)
                elif out.finished:
                    self._streams.pop(out.request_id, None)


def _notify(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Hand a callback to a caller's event loop; False if that loop has closed (the engine thread lives on)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _settle(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
