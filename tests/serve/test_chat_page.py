"""The chat page at GET /, end to end: Debian's Chromium, driven by Playwright, against a real server.

The tiny random model writes noise, so what the page shows is checked against what the API answers to the same
greedy request.  Tool calls and failures the random model cannot be made to produce are played to the page by
Playwright's request routing, as canned server-sent events shaped like this server's (and OpenAI's).
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, metrics, wait_idle

CHROMIUM = "/usr/bin/chromium"
# No network here: without these Chromium keeps dialling Google services and floods the log with refusals.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
CHAT_URL = "**/v1/chat/completions"


# =============================================================================================
# fixtures and helpers


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium), which this "
                    "test drives through Playwright (.ci/run installs it; `playwright install` is not used)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Chat:
    """One browser tab on the chat page, with what it sent and what went wrong in it.

    Conditions for wait_for_function are written as functions: Playwright evaluates a bare expression with eval,
    which the page's content policy (rightly) refuses.
    """

    def __init__(self, page, url: str) -> None:
        self.page = page
        self.url = url
        self.bodies: list[dict] = []      # the JSON bodies of its POST /v1/chat/completions, in order
        self.headers: list[dict] = []
        self.page_errors: list[str] = []  # uncaught exceptions, and anything the content policy refused
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.page_errors.append(message.text)

    def _request(self, request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.bodies.append(request.post_data_json)
            self.headers.append(request.headers)

    def open(self, expect_model: bool = True) -> Chat:
        self.page.goto(self.url + "/")
        if expect_model:
            self.page.wait_for_function("name => document.getElementById('model').textContent === name",
                                        arg=MODEL_NAME)
        return self

    def settings(self, thinking: bool | None = None, **fields: str) -> Chat:
        if thinking is not None:
            self.page.locator("#thinking").set_checked(thinking)
        ids = {"temperature": "#temperature", "top_p": "#top-p", "max_tokens": "#max-tokens", "tools": "#tools",
               "api_key": "#api-key", "system": "#system"}
        for name, value in fields.items():
            self.page.locator(ids[name]).fill(value)
        return self

    def outcomes(self) -> int:
        return self.page.locator(".msg.assistant, .error").count()

    def send(self, text: str, wait: bool = True) -> Chat:
        before = self.outcomes()
        self.page.locator("#input").fill(text)
        self.page.locator("#input").press("Enter")
        if wait:
            self.wait_done(before + 1)
        return self

    def wait_done(self, outcomes: int, timeout: float = 30_000) -> None:
        """Until the page shows `outcomes` answers and error lines in all, and no request is in flight."""
        self.page.wait_for_function(
            "n => document.querySelectorAll('.msg.assistant, .error').length >= n"
            " && !document.body.classList.contains('busy')", arg=outcomes, timeout=timeout)

    def last(self, selector: str):
        return self.page.locator(selector).last

    def text(self, selector: str) -> str:
        return self.last(selector).text_content() or ""


@pytest.fixture
def chat(browser, server) -> Iterator[Chat]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(20_000)
    c = Chat(page, server.url)
    yield c
    context.close()
    assert not c.page_errors, c.page_errors


def api_chat(url: str, messages: list[dict], **fields) -> dict:
    """The same request as the page's, unstreamed, straight to the API: what the page should show."""
    body = {"model": MODEL_NAME, "messages": messages, "temperature": 0, **fields}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]


def check_screenshot(path: Path, page, region) -> None:
    """The PNG is the viewport, shows more than a blank page, and has something drawn inside `region`."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
    box = region.bounding_box()
    assert box is not None and box["width"] > 20 and box["height"] > 10, box
    try:
        from PIL import Image
    except ImportError:  # Pillow is not a test dependency: a blank page compresses to a few KiB
        assert len(data) > 20_000
        return
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        assert len(rgb.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50
        inside = rgb.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"])))
        assert len(inside.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 5  # text, not an empty box


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 0, "model": MODEL_NAME,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def canned(replies: list[dict]):
    """A route handler answering the page's chat requests with `replies` in turn: {"status", "body", "type"}."""
    def handle(route) -> None:
        reply = replies.pop(0)
        route.fulfill(status=reply.get("status", 200), body=reply["body"],
                      headers={"Content-Type": reply.get("type", "text/event-stream")})
    return handle


# =============================================================================================
# the page itself


def test_page_and_assets_are_served_self_contained(server, secured_server):
    before = metrics(server.url).get('qwen35_http_requests_total{endpoint="/",status="200"}', 0)
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert 'src="static/chat.js"' in page.text and 'href="static/chat.css"' in page.text
    texts = [page.text]
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        asset = httpx.get(f"{server.url}/static/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        texts.append(asset.text)
    for text in texts:  # nothing from a CDN or a font service: the page works offline
        assert not re.search(r"https?://|[\"'(]//|@import|@font-face", text), text[:200]
    assert "innerHTML" not in texts[1]  # model output goes in as text only

    # only the page's own files: no paths, no other names
    for bad in ("/static/app.py", "/static/..%2Fapp.py", "/static/../app.py", "/static/", "/static/chat.html%00"):
        r = httpx.get(server.url + bad, timeout=10)
        assert r.status_code == 404 and "error" in r.json(), bad
    m = metrics(server.url)
    assert m['qwen35_http_requests_total{endpoint="/",status="200"}'] == before + 1
    assert m['qwen35_http_requests_total{endpoint="/static/chat.js",status="200"}'] >= 1

    # a server with a key serves the page without it; the API still wants it
    assert httpx.get(secured_server.url + "/", timeout=10).status_code == 200
    assert httpx.get(secured_server.url + "/static/chat.js", timeout=10).status_code == 200
    assert httpx.get(secured_server.base_url + "/models", timeout=10).status_code == 401


# =============================================================================================
# against the real server


def test_streamed_answer_history_and_new_chat(chat, server, tmp_path):
    # every change to the answer's text, as the page makes it
    chat.page.add_init_script("""
        window.__answerLengths = [];
        new MutationObserver(() => {
            const answer = [...document.querySelectorAll('.msg.assistant .answer')].pop();
            if (answer) window.__answerLengths.push(answer.textContent.length);
        }).observe(document, {subtree: true, childList: true, characterData: true});
    """)
    chat.open().settings(thinking=False, temperature="0", max_tokens="48").send("Hello!")
    expected = api_chat(server.url, [{"role": "user", "content": "Hello!"}], max_tokens=48,
                        chat_template_kwargs={"enable_thinking": False})
    answer = chat.text(".msg.assistant .answer")
    assert answer and answer == expected["content"]
    assert chat.page.locator(".reasoning").count() == 0  # thinking off: no thinking block at all
    assert chat.page.locator(".error").count() == 0
    assert re.search(r"\d+ tokens", chat.text(".msg.assistant .meta"))

    body = chat.bodies[0]
    assert body["stream"] is True and body["model"] == MODEL_NAME
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["temperature"] == 0 and body["max_tokens"] == 48
    assert "top_p" not in body  # an empty field is the server's default
    assert body["messages"] == [{"role": "user", "content": "Hello!"}]
    lengths = chat.page.evaluate("window.__answerLengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # it grew piece by piece

    shot = tmp_path / "answer.png"
    chat.page.screenshot(path=str(shot))
    check_screenshot(shot, chat.page, chat.last(".msg.assistant .answer"))

    # the conversation goes with the next message
    chat.send("And then?")
    assert chat.bodies[1]["messages"] == [{"role": "user", "content": "Hello!"},
                                          {"role": "assistant", "content": answer},
                                          {"role": "user", "content": "And then?"}]
    assert chat.page.locator(".msg.user").count() == 2

    chat.page.locator("#new-chat").click()
    assert chat.page.locator(".msg").count() == 0
    chat.send("Hi again")
    assert chat.bodies[2]["messages"] == [{"role": "user", "content": "Hi again"}]


def test_reasoning_is_shown_apart_and_collapsible(chat, server, tmp_path):
    chat.open().settings(thinking=True, temperature="0", max_tokens="24").send("Think first")
    expected = api_chat(server.url, [{"role": "user", "content": "Think first"}], max_tokens=24)
    assert chat.bodies[0]["chat_template_kwargs"] == {"enable_thinking": True}
    reasoning = chat.last(".msg.assistant .reasoning")
    text = chat.text(".msg.assistant .reasoning-text")
    assert text and text == expected["reasoning_content"]
    assert chat.text(".msg.assistant .answer") == (expected["content"] or "")  # apart from the thinking
    assert reasoning.evaluate("e => e.tagName") == "DETAILS"

    shot = tmp_path / "reasoning.png"
    chat.page.screenshot(path=str(shot))
    check_screenshot(shot, chat.page, reasoning)

    body_text = chat.last(".msg.assistant .reasoning-text")
    assert reasoning.evaluate("e => e.open") and body_text.is_visible()
    reasoning.locator("summary").click()
    assert not reasoning.evaluate("e => e.open") and not body_text.is_visible()
    reasoning.locator("summary").click()
    assert body_text.is_visible()

    # the thinking goes back with the assistant message (the template decides what to keep of it)
    chat.send("Go on")
    assistant = chat.bodies[1]["messages"][1]
    assert assistant == {"role": "assistant", "content": expected["content"] or "", "reasoning_content": text}


def test_stop_button_aborts_the_request_on_the_server(chat, server):
    before = wait_idle(server.url)
    chat.open().settings(thinking=False, temperature="0", max_tokens="1000")
    chat.send("Tell me a long story", wait=False)
    chat.page.wait_for_function(
        "() => { const a = document.querySelector('.msg.assistant .answer'); return a && a.textContent.length > 20 }")
    busy = metrics(server.url)
    assert busy["qwen35_num_requests_running"] >= 1 and chat.page.locator("#send").is_disabled()
    chat.page.locator("#stop").click()
    chat.page.wait_for_function("() => !document.body.classList.contains('busy')")

    m = wait_idle(server.url)
    assert m["qwen35_num_requests_running"] == 0 and m["qwen35_kv_cache_blocks_used"] == 0
    assert m["qwen35_requests_aborted_total"] == before["qwen35_requests_aborted_total"] + 1
    assert m["qwen35_generation_tokens_total"] < before["qwen35_generation_tokens_total"] + 900  # cut short
    assert "stopped" in chat.text(".msg.assistant .meta")
    assert chat.page.locator(".error").count() == 0  # stopping is not an error
    partial = chat.text(".msg.assistant .answer")
    time.sleep(0.3)
    assert chat.text(".msg.assistant .answer") == partial  # nothing more arrives

    # usable again, and the partial answer is part of the conversation
    assert chat.page.locator("#send").is_enabled() and chat.page.locator("#stop").is_disabled()
    chat.settings(max_tokens="4").send("Shorter please")
    assert "stopped" not in chat.text(".msg.assistant .meta")
    assert chat.bodies[1]["messages"][1] == {"role": "assistant", "content": partial}


def test_api_key(browser, secured_server):
    context = browser.new_context(viewport=VIEWPORT)
    try:
        chat = Chat(context.new_page(), secured_server.url).open(expect_model=False)
        chat.page.wait_for_selector(".error")  # the model list needs the key
        assert "401" in chat.text(".error") and "API key" in chat.text(".error")

        chat.settings(api_key=API_KEY, thinking=False, temperature="0", max_tokens="4").send("Hello!")
        assert chat.page.locator("#model").text_content() == MODEL_NAME
        assert chat.headers[-1]["authorization"] == f"Bearer {API_KEY}"
        assert chat.text(".msg.assistant .answer")

        errors = chat.page.locator(".error").count()
        chat.settings(api_key="sk-wrong").send("Hello?")
        assert chat.page.locator(".error").count() > errors
        assert "401" in chat.text(".error") and "invalid API key" in chat.text(".error")
        assert chat.page.locator("#input").input_value() == "Hello?"  # given back, to send again
        assert not chat.page_errors, chat.page_errors
    finally:
        context.close()


def test_server_refusal_is_shown(chat):
    chat.open().settings(thinking=False, top_p="5", max_tokens="4").send("Hello!")
    error = chat.text(".error")
    assert error.startswith("Error: 400: ") and "top_p" in error
    assert chat.page.locator(".msg.user.failed").count() == 1
    # the failed message is not part of the conversation: fixed settings, and it goes alone
    chat.settings(top_p="").send("Hello!")
    assert chat.bodies[1]["messages"] == [{"role": "user", "content": "Hello!"}]
    assert chat.text(".msg.assistant .answer")


# =============================================================================================
# canned streams: what the random model does not produce


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def test_tool_calls_and_results(chat, tmp_path):
    first = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user wants the weather. ", "reasoning": "The user wants the weather. "}),
        chunk({"reasoning_content": "I call the tool.", "reasoning": "I call the tool."}),
        chunk({"content": "Let me check <b>that</b> <img src=x onerror=alert(1)>."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is", "unit": "celsius"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]}),
        chunk({}, "tool_calls"),
        {**chunk({}), "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 42, "total_tokens": 72}},
        "[DONE]")
    second = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "It is 21 degrees and sunny."}),
                 chunk({}, "stop"), "[DONE]")
    chat.page.route(CHAT_URL, canned([{"body": first}, {"body": second}]))
    chat.open().settings(tools=json.dumps(TOOLS)).send("Weather in Paris?")

    calls = chat.page.locator(".msg.assistant .tool-call")
    assert calls.count() == 2
    assert calls.nth(0).locator(".tool-name").text_content() == "get_weather"
    assert calls.nth(0).locator(".tool-args").text_content() == json.dumps({"city": "Paris", "unit": "celsius"},
                                                                           indent=2)
    assert calls.nth(1).locator(".tool-name").text_content() == "get_time"
    assert calls.nth(1).locator(".tool-args").text_content() == '{\n  "tz": "Europe/Paris"\n}'
    # the markup the model wrote is text on the page, not elements
    assert chat.text(".msg.assistant .answer") == "Let me check <b>that</b> <img src=x onerror=alert(1)>."
    assert chat.page.locator(".msg b, .msg img").count() == 0
    # the thinking is apart, and folded away once the answer began
    reasoning = chat.last(".msg.assistant .reasoning")
    assert chat.text(".reasoning-text") == "The user wants the weather. I call the tool."
    assert not reasoning.evaluate("e => e.open")
    assert "42 tokens" in chat.text(".msg.assistant .meta")
    assert chat.bodies[0]["tools"] == TOOLS

    inputs = chat.page.locator(".tool-result-input")
    assert inputs.count() == 2
    inputs.nth(0).fill('{"temp": 21, "sky": "sunny"}')
    inputs.nth(1).fill("12:00")
    shot = tmp_path / "tools.png"
    chat.page.screenshot(path=str(shot))
    check_screenshot(shot, chat.page, calls.nth(0))

    before = chat.outcomes()
    chat.page.locator(".send-tool-results").click()
    chat.wait_done(before + 1)
    assert chat.page.locator(".tool-results").count() == 0  # answered
    results = chat.page.locator(".msg.tool")
    assert results.count() == 2
    assert "get_weather" in results.nth(0).locator(".role").text_content()
    assert results.nth(0).locator("pre").text_content() == '{\n  "temp": 21,\n  "sky": "sunny"\n}'
    assert results.nth(1).locator("pre").text_content() == "12:00"
    assert chat.text(".msg.assistant .answer") == "It is 21 degrees and sunny."

    assert chat.bodies[1]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check <b>that</b> <img src=x onerror=alert(1)>.",
         "reasoning_content": "The user wants the weather. I call the tool.",
         "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
             {"id": "call_2", "type": "function",
              "function": {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]


def test_errors_are_shown(chat):
    failing_stream = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Half an"}),
                         {"error": {"message": "generation failed: the engine broke", "type": "server_error",
                                    "param": None, "code": "engine_error"}}, "[DONE]")
    ok = sse(chunk({"content": "Fine."}), chunk({}, "stop"), "[DONE]")
    replies = [
        {"body": failing_stream},
        {"status": 500, "type": "application/json",
         "body": json.dumps({"error": {"message": "internal server error: KeyError", "type": "server_error"}})},
        {"status": 502, "type": "text/html", "body": "<html>Bad gateway</html>"},
        {"body": sse(chunk({"content": "cut"}))},  # the connection ends with no finish and no [DONE]
        {"type": "application/json", "body": json.dumps({"object": "chat.completion", "choices": []})},
        {"body": ok},
    ]
    chat.page.route(CHAT_URL, canned(replies))
    chat.open().settings(thinking=False)

    chat.send("one")
    assert chat.text(".error") == "Error: generation failed: the engine broke"
    assert chat.text(".msg.assistant.failed .answer") == "Half an"  # what came is kept in sight, marked failed
    assert chat.page.locator("#input").input_value() == "one"  # given back
    assert chat.page.locator(".msg.user.failed").count() == 1
    chat.send("two")
    assert chat.text(".error") == "Error: 500: internal server error: KeyError"
    assert chat.page.locator(".msg.assistant").count() == 1  # no empty answer box for a request that failed
    chat.send("three")
    assert chat.text(".error").startswith("Error: HTTP 502") and "Bad gateway" in chat.text(".error")
    chat.send("four")
    assert "closed before the answer was complete" in chat.text(".error")
    chat.send("five")
    assert chat.text(".error").startswith("Error: the server answered application/json instead of an event stream")
    assert chat.page.locator(".error").count() == 5

    chat.page.unroute(CHAT_URL)
    chat.page.route(CHAT_URL, lambda route: route.abort("connectionrefused"))
    chat.send("six")
    assert "could not reach the server" in chat.text(".error")

    chat.page.unroute(CHAT_URL)
    chat.page.route(CHAT_URL, canned(replies))
    requests = len(chat.bodies)
    chat.settings(tools="[not json").send("seven")
    assert "Tools is not valid JSON" in chat.text(".error") and len(chat.bodies) == requests  # not sent
    assert chat.page.locator("#input").input_value() == "seven" and chat.page.locator(".error").count() == 7

    # after all that, failed turns left nothing in the conversation
    chat.settings(tools="").send("eight")
    assert chat.text(".msg.assistant .answer") == "Fine."
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "eight"}]
    assert chat.page.locator("#send").is_enabled()
