"""``AsyncLLM``: the engine driven on a background thread, for servers.

Token-level like the rest of ``engine/``: prompts are strings (encoded by the engine's tokenizer) or token ids,
outputs are :class:`~qwen35.engine.RequestOutput`.  The text-level facade (chat template, parsers) is
:class:`qwen35.LLM`, which builds the engine this drives.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from .llm_engine import LLMEngine, RequestOutput
from .multimodal import VisionInput
from .params import SamplingParams

Prompt = str | list[int]
logger = logging.getLogger("qwen35.engine")


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
                       request_id: str | None = None, vision: VisionInput | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; leaving the iterator early (client gone) aborts it.  ``vision``: the
        prompt's preprocessed images / videos (see LLMEngine.add_request)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()
        # The id is fixed here, not by the engine, so that a caller cancelled before admission can still abort.
        request_id = request_id if request_id is not None else f"async-{uuid.uuid4().hex}"
        self._inbox.put(("add", prompt, params, request_id, vision, loop, q, done))
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
        if self.engine.cache.prefix_caching:
            s.update(self.engine.cache.prefix_usage())
        s["running"] = len(self.engine.scheduler.running)
        s["waiting"] = len(self.engine.scheduler.waiting)
        drafter = getattr(self.engine, "drafter", None)
        if drafter is not None:
            s.update(drafter.stats.as_dict())
        return s

    # -- engine thread ---------------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, prompt, params, rid, vision, loop, q, done = msg
                try:
                    rid = self.engine.add_request(prompt, params, rid, vision=vision)
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
