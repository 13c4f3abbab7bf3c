"""Many concurrent streams, and clients that go away: their requests are aborted and their cache freed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from .conftest import MODEL_NAME, chat_body, metrics, wait_idle


def test_64_concurrent_streaming_clients(server):
    openai = pytest.importorskip("openai")

    async def one(client, k: int) -> tuple[str, str | None, int]:
        text, finish, chunks = "", None, 0
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Request number {k}"}], max_tokens=6,
            temperature=0.7, seed=k, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": k % 2 == 0}})
        async for chunk in stream:
            chunks += 1
            for c in chunk.choices:
                text += (c.delta.content or "") + (getattr(c.delta, "reasoning_content", None) or "")
                finish = c.finish_reason or finish
        return text, finish, chunks

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[one(c, k) for k in range(64)])

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(finish in ("stop", "length") and chunks >= 2 for _, finish, chunks in results)
    m = wait_idle(server.url)
    assert m["qwen35_kv_cache_blocks_used"] == 0 and m["qwen35_num_requests_running"] == 0


def test_streaming_client_disconnect_frees_its_cache(server):
    before = metrics(server.url)["qwen35_requests_aborted_total"]
    body = chat_body(max_tokens=1000, stream=True, ignore_eos=True)
    with httpx.Client(timeout=30) as http, http.stream("POST", server.base_url + "/chat/completions",
                                                       json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 4:
                break
        busy = metrics(server.url)  # the request is running and holds cache
        assert busy["qwen35_num_requests_running"] >= 1 and busy["qwen35_state_slots_used"] >= 1
        assert busy["qwen35_kv_cache_blocks_used"] >= 1
    # leaving the block closed the connection mid-stream
    m = wait_idle(server.url)
    assert m["qwen35_num_requests_running"] == 0 and m["qwen35_kv_cache_blocks_used"] == 0
    assert m["qwen35_state_slots_used"] == 0
    assert m["qwen35_requests_aborted_total"] == before + 1
    assert m["qwen35_generation_tokens_total"] < busy["qwen35_generation_tokens_total"] + 900  # it stopped early


def test_non_streaming_client_disconnect_aborts(server):
    before = metrics(server.url)["qwen35_requests_aborted_total"]
    start = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/chat/completions", json=chat_body(max_tokens=1000, ignore_eos=True),
                   timeout=0.5)
    m = wait_idle(server.url)
    assert m["qwen35_num_requests_running"] == 0 and m["qwen35_kv_cache_blocks_used"] == 0
    assert m["qwen35_requests_aborted_total"] == before + 1
    assert time.monotonic() - start < 10
    assert httpx.get(server.url + "/health").status_code == 200


def test_engine_failure_is_reported_in_band_and_the_server_recovers(server, async_llm):
    engine = async_llm.engine

    def failing_step():
        del engine.step  # fail once, then the class's step again
        raise RuntimeError("injected failure")

    # non-streaming: a server error, said as such
    engine.step = failing_step
    response = httpx.post(server.base_url + "/chat/completions", json=chat_body(max_tokens=4), timeout=30)
    assert response.status_code == 500 and "injected failure" in response.json()["error"]["message"]
    # streaming: the 200 is out, so the error comes as an event, then [DONE]
    engine.step = failing_step
    with httpx.stream("POST", server.base_url + "/chat/completions", json=chat_body(max_tokens=4, stream=True),
                      timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "injected failure" in events[-2]
    assert "error" in json.loads(events[-2])
    wait_idle(server.url)
    again = httpx.post(server.base_url + "/chat/completions", json=chat_body(max_tokens=3), timeout=30)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
    assert metrics(server.url)["qwen35_engine_step_errors_total"] >= 2


def test_request_cancelled_while_being_admitted_is_aborted(server, async_llm):
    # A client can go away before the engine thread has even admitted its request; the request must not then
    # run to max_tokens with nobody listening.
    from qwen35.engine import SamplingParams

    async def main():
        for request_id in ("cancel-early", None):
            agen = async_llm.generate([65, 66, 67], SamplingParams(max_tokens=3000, ignore_eos=True), request_id)
            task = asyncio.ensure_future(agen.__anext__())
            await asyncio.sleep(0)  # the task now waits for admission
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # keep this loop open until the engine thread has admitted (and aborted) both: it answers on this loop
        deadline = time.monotonic() + 10
        while async_llm.engine.requests or not async_llm._inbox.empty():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    asyncio.run(main())
    start = time.monotonic()
    m = wait_idle(server.url, timeout=20)
    assert m["qwen35_num_requests_running"] == 0 and m["qwen35_kv_cache_blocks_used"] == 0
    assert time.monotonic() - start < 5  # 2 x 3000 tokens would take far longer
