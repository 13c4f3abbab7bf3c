"""Pictures through the HTTP API: image_url / video_url parts reach the model (the answer equals ``LLM.chat`` on the
same picture, and the engine's answer on transformers' preprocessing of it), the media policy decides where
pictures may come from (data: URLs always; local files only inside --allowed-local-media-path; http(s) only with
--allow-remote-media, and then with the byte limit and a timeout), and every picture that cannot be used is a 400
naming its content part -- never a 500, and the server stays healthy.

The model is a random-weight multimodal checkpoint with the embedded tokenizer (tests/vision_checkpoint.py); the
text-only refusals use the session's tiny text model (conftest.py)."""

from __future__ import annotations

import asyncio
import http.server
import io
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import qwen35
from qwen35 import SamplingParams
from qwen35.chat.completion import build_chat_prompt
from qwen35.chat.media import ImageProcessorConfig, MediaLimits, expand_placeholders
from qwen35.chat.vision_prompt import MediaPolicy, VisionPreparer
from qwen35.engine import AsyncLLM, VisionInput
from qwen35.serve import create_app
from qwen35.serve.server import media_policy, serve
from tests.vision_checkpoint import build_vision_checkpoint, data_url, encoded, picture

from .conftest import _start, metrics

openai = pytest.importorskip("openai")

NAME = "tiny-vision"
GREEDY = {"temperature": 0, "max_tokens": 6}
REMOTE_LIMIT = 100_000  # bytes, for the server that fetches


# =============================================================================================
# fixtures


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory) -> Path:
    return build_vision_checkpoint(tmp_path_factory.mktemp("vision_ckpt"))


@pytest.fixture(scope="module")
def vision_engine(vision_folder) -> Iterator[AsyncLLM]:
    engine = AsyncLLM(qwen35.LLM(vision_folder, dtype="float32").engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference_llm(vision_folder):
    # its own engine: the servers' engine is driven by AsyncLLM's thread
    return qwen35.LLM(vision_folder, dtype="float32")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """DIR (for --allowed-local-media-path) holding inside.png; beside it, outside.png; in it, a link to that."""
    top = tmp_path_factory.mktemp("media")
    folder = top / "allowed"
    folder.mkdir()
    (folder / "inside.png").write_bytes(encoded(picture(0)))
    (top / "outside.png").write_bytes(encoded(picture(0)))
    os.symlink(top / "outside.png", folder / "link.png")
    return folder


def _server(engine: AsyncLLM, folder: Path, policy: MediaPolicy) -> Iterator:
    yield from _start(create_app(engine, NAME, vision=VisionPreparer.for_folder(folder, policy)))


@pytest.fixture(scope="module")
def vision_server(vision_engine, vision_folder):
    """The server's default policy: data: URLs only."""
    yield from _server(vision_engine, vision_folder, media_policy())


@pytest.fixture(scope="module")
def local_server(vision_engine, vision_folder, media_dir):
    yield from _server(vision_engine, vision_folder, media_policy(allowed_local_media_path=media_dir))


@pytest.fixture(scope="module")
def remote_server(vision_engine, vision_folder):
    policy = MediaPolicy(allow_local=False, allow_remote=True, remote_timeout_s=1.0,
                         limits=MediaLimits(max_image_bytes=REMOTE_LIMIT))
    yield from _server(vision_engine, vision_folder, policy)


class PictureHost:
    """A local HTTP server that counts the connections it gets: /x.png, /big.png (over REMOTE_LIMIT), /slow.png
    (answers after 3 s), anything else 404."""

    def __init__(self) -> None:
        host = self
        self.connections = 0
        self.paths: list[str] = []
        files = {"/x.png": encoded(picture(0)), "/big.png": os.urandom(REMOTE_LIMIT + 50_000)}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.paths.append(self.path)
                if self.path == "/slow.png":
                    time.sleep(3)
                body = files.get(self.path)
                if body is None and self.path != "/slow.png":
                    self.send_error(404)
                    return
                body = body or files["/x.png"]
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                host.connections += 1
                return True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that stops reading (the size limit, the timeout) is what some tests are about

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def picture_host() -> Iterator[PictureHost]:
    host = PictureHost()
    yield host
    host.close()


# =============================================================================================
# helpers


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts: dict, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server, messages: list[dict], **fields) -> httpx.Response:
    body = {"model": NAME, "messages": messages, **GREEDY, **fields}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=120)


def assert_refused(r: httpx.Response, param: str, *fragments: str) -> None:
    assert r.status_code == 400, r.text
    assert "Traceback" not in r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


def server_errors(server) -> float:
    """How many 500s the server has answered so far (the shared test server also serves tests that cause some)."""
    return sum(v for k, v in metrics(server.url).items() if 'status="500"' in k)


def assert_healthy(server, errors_before: float = 0.0) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server_errors(server) == errors_before


def logprobs_of(body: dict, index: int = 0) -> list[float]:
    return [entry["logprob"] for entry in body["choices"][index]["logprobs"]["content"]]


def transformers_vision(folder: Path, data: bytes) -> VisionInput:
    """The picture as transformers' Qwen2VLImageProcessor (PIL backend) preprocesses it, with the checkpoint's
    settings, from Pillow's own opening of the bytes."""
    import transformers as tf

    settings = ImageProcessorConfig.from_folder(folder).to_dict()
    for key in ("image_processor_type", "processor_class"):
        settings.pop(key)
    out = tf.Qwen2VLImageProcessorPil(**settings)(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    return VisionInput(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])


def engine_logprobs(engine: AsyncLLM, text: str, vision: VisionInput) -> list[float]:
    async def run() -> list[float]:
        last = None
        async for out in engine.generate(text, SamplingParams(**GREEDY, logprobs=0), vision=vision):
            last = out
        return list(last.outputs[0].logprobs)

    return asyncio.run(run())


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is a few bytes: a decompression bomb's
    shape (decoding it would fail as truncated, so a refusal that names the size was made before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _animation(fmt: str) -> bytes:
    frames = [picture(20 + k, (40, 40)) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _rgba() -> Image.Image:
    img = picture(3).convert("RGBA")
    img.putalpha(picture(4).convert("L"))  # transparency that varies: composited on white, as transformers does
    return img


def _palette_with_transparency() -> bytes:
    pal = Image.fromarray(np.random.default_rng(0).integers(0, 4, (50, 70), dtype=np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    return encoded(pal, transparency=1)


# Pictures transformers' processor takes: the server answers them as the engine answers transformers' pixels.
ACCEPTED = {
    "one_pixel": lambda: encoded(Image.new("RGB", (1, 1), (200, 30, 30))),  # smart_resize scales it up to 256x256
    "cmyk_jpeg": lambda: encoded(picture(1).convert("CMYK"), "JPEG"),
    "palette_with_transparency": _palette_with_transparency,
    "rgba": lambda: encoded(_rgba()),
    "gray_16bit": lambda: encoded(Image.fromarray(
        np.random.default_rng(1).integers(0, 65536, (50, 70), dtype=np.uint16))),
    "animated_gif": lambda: _animation("GIF"),  # an image part: its first frame, as transformers' loader takes
    "animated_png": lambda: _animation("PNG"),
}

# Pictures that cannot be used, or may not be read: (name, url, what the message says).
REFUSED = [
    ("corrupt", lambda: data_url(b"\x00not a picture" * 8), "is not an image format Pillow can read"),
    ("truncated", lambda: data_url(encoded(picture(5))[:300]), "is corrupt or truncated"),
    ("bomb_header", lambda: data_url(png_header(20000, 20000)), "declares too many pixels"),
    ("over_pixel_limit", lambda: data_url(png_header(10000, 10000)),
     "10000x10000 = 100000000 pixels, over the limit of 67108864 (MediaLimits.max_image_pixels)"),
    ("aspect_ratio", lambda: data_url(encoded(Image.new("RGB", (4000, 10)))),
     "aspect ratio 400.0 is beyond the 200:1 the vision processor accepts"),
    ("bad_base64", lambda: "data:image/png;base64,@@@@", "invalid base64"),
    ("not_base64", lambda: "data:image/png,rawtext", "is not base64-encoded"),
    ("file_url", lambda: "file:///etc/passwd", "local files are not allowed here", "--allowed-local-media-path"),
    ("bare_path", lambda: "/etc/passwd", "local files are not allowed here"),
    ("ftp", lambda: "ftp://example.com/x.png", "URLs of scheme 'ftp' are not supported"),
]


# =============================================================================================
# the answer


def test_the_answer_equals_llm_chat(vision_server, reference_llm):
    messages = ask(image_part(data_url(encoded(picture(0)))))
    ref = reference_llm.chat(messages, SamplingParams(**GREEDY, logprobs=0))
    with openai.OpenAI(base_url=vision_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        r = client.chat.completions.create(model=NAME, messages=messages, logprobs=True, **GREEDY)
        message = r.choices[0].message
        assert (message.content, message.model_extra["reasoning_content"]) == (ref.content, ref.reasoning)
        assert r.usage.prompt_tokens == ref.usage["prompt_tokens"] > 64  # the picture is 64 tokens or more
        assert [e.logprob for e in r.choices[0].logprobs.content] == pytest.approx(ref.choices[0].logprobs, abs=1e-4)

        # streamed, the same text
        content = reasoning = ""
        for chunk in client.chat.completions.create(model=NAME, messages=messages, stream=True, **GREEDY):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
        assert (content, reasoning) == (ref.content or "", ref.reasoning or "")

        # n > 1: every choice sees the picture
        r = client.chat.completions.create(model=NAME, messages=messages, n=2, **GREEDY)
        assert [c.message.content for c in r.choices] == [ref.content] * 2
        assert [c.message.model_extra["reasoning_content"] for c in r.choices] == [ref.reasoning] * 2

    # transformers' form of the part gives the same answer
    same = post(vision_server, ask({"type": "image", "image": data_url(encoded(picture(0)))}), logprobs=True)
    assert same.status_code == 200 and logprobs_of(same.json()) == pytest.approx(ref.choices[0].logprobs, abs=1e-4)
    # the picture matters (else this test could not fail): another one scores the answer differently
    other = post(vision_server, ask(image_part(data_url(encoded(picture(9))))), logprobs=True)
    assert other.status_code == 200 and logprobs_of(other.json()) != pytest.approx(ref.choices[0].logprobs, abs=1e-4)
    m = metrics(vision_server.url)
    assert m['qwen35_media_inputs_total{kind="image",outcome="accepted"}'] >= 5


def test_a_video_equals_llm_chat(vision_server, reference_llm):
    messages = ask({"type": "video_url", "video_url": {"url": data_url(_animation("GIF"), "image/gif")}},
                   text="What happens?")
    ref = reference_llm.chat(messages, SamplingParams(**GREEDY))
    r = post(vision_server, messages)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (ref.content, ref.reasoning)
    assert r.json()["usage"]["prompt_tokens"] == ref.usage["prompt_tokens"]
    corrupt = ask({"type": "video_url", "video_url": {"url": data_url(b"\x00" * 500, "video/mp4")}})
    assert_refused(post(vision_server, corrupt), "messages[0].content[0]", "could not be opened as a video")
    assert_healthy(vision_server)


# =============================================================================================
# what a picture may be


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_pictures_are_answered_as_transformers_preprocesses_them(name, vision_server, vision_engine,
                                                                     vision_folder, reference_llm):
    data = ACCEPTED[name]()
    messages = ask(image_part(data_url(data)))
    r = post(vision_server, messages, logprobs=True)
    assert r.status_code == 200, r.text
    ours = logprobs_of(r.json())
    expected = transformers_vision(vision_folder, data)
    text = expand_placeholders(build_chat_prompt(reference_llm.tokenizer, messages).text, expected.image_grid_thw)
    assert r.json()["usage"]["prompt_tokens"] == len(reference_llm.tokenizer.encode(text))
    assert ours == pytest.approx(engine_logprobs(vision_engine, text, expected), abs=1e-4)


@pytest.mark.parametrize("name,url,fragments", [(n, u, f) for n, u, *f in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_pictures_are_a_400_naming_the_part(name, url, fragments, vision_server):
    before = metrics(vision_server.url).get('qwen35_media_inputs_total{kind="image",outcome="refused"}', 0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, image_part(url())]}]
    assert_refused(post(vision_server, messages), "messages[0].content[1]", "messages[0].content[1]: ", *fragments)
    assert metrics(vision_server.url)['qwen35_media_inputs_total{kind="image",outcome="refused"}'] == before + 1
    assert_healthy(vision_server)


def test_malformed_picture_parts(vision_server):
    assert_refused(post(vision_server, ask({"type": "image_url", "image_url": {}})), "messages[0].content[0]",
                   'the image_url part needs {"url": "..."}')
    assert_refused(post(vision_server, ask({"type": "image"})), "messages[0].content[0]", "holds no picture")
    # a placeholder typed into the text matches no picture
    assert_refused(post(vision_server, [{"role": "user", "content": "<|image_pad|> what is this?"}]), "messages",
                   "placeholders do not match", "1 <|image_pad|> placeholders but 0 images")
    # the template's own rule
    system = [{"role": "system", "content": [image_part(data_url(encoded(picture(0))))]},
              {"role": "user", "content": "hi"}]
    assert_refused(post(vision_server, system), "messages", "System message cannot contain images")
    # a streamed request is refused before its stream begins
    assert_refused(post(vision_server, ask(image_part("/etc/passwd")), stream=True), "messages[0].content[0]",
                   "local files are not allowed here")
    assert_healthy(vision_server)


def test_a_text_model_refuses_pictures(server):
    errors = server_errors(server)
    for part in (image_part(data_url(encoded(picture(0)))),
                 {"type": "video_url", "video_url": {"url": data_url(_animation("GIF"), "image/gif")}},
                 {"type": "image", "image": data_url(encoded(picture(0)))}, {"image_url": {"url": "x.png"}}):
        for stream in (False, True):
            body = {"model": "tiny-qwen35", "messages": ask(part), "max_tokens": 4, "stream": stream}
            r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
            assert_refused(r, "messages[0].content[0]", "this model cannot take images or videos: it has no "
                           "vision tower (its config has no vision_config)")
    m = metrics(server.url)
    assert m['qwen35_media_inputs_total{kind="image",outcome="refused"}'] >= 6
    assert m['qwen35_media_inputs_total{kind="video",outcome="refused"}'] >= 2
    assert_healthy(server, errors)


# =============================================================================================
# where a picture may come from


def test_local_files_only_inside_the_allowed_folder(local_server, vision_server, media_dir):
    inside = media_dir / "inside.png"
    for part in (image_part(str(inside)), image_part(inside.as_uri()), {"type": "image", "image": str(inside)},
                 {"type": "image", "path": str(inside)}):
        r = post(local_server, ask(part))
        assert r.status_code == 200, r.text
    outside = media_dir.parent / "outside.png"
    for path in (str(outside), outside.as_uri(), f"{media_dir}/../outside.png", str(media_dir / "link.png"),
                 "/etc/passwd", "file:///etc/passwd"):
        assert_refused(post(local_server, ask(image_part(path))), "messages[0].content[0]",
                       "is outside the allowed media folder", str(media_dir.resolve()))
    assert_refused(post(local_server, ask(image_part(str(media_dir / "missing.png")))), "messages[0].content[0]",
                   "no such file")
    # without the flag, no local file at all
    for path in (str(inside), inside.as_uri()):
        assert_refused(post(vision_server, ask(image_part(path))), "messages[0].content[0]",
                       "local files are not allowed here")
    assert_healthy(local_server)


def test_remote_urls_only_when_allowed(vision_server, remote_server, picture_host):
    url = picture_host.url + "/x.png"
    assert_refused(post(vision_server, ask(image_part(url))), "messages[0].content[0]",
                   "remote URLs are not fetched here", "--allow-remote-media")
    assert picture_host.connections == 0  # refused without a connection
    r = post(remote_server, ask(image_part(url)), logprobs=True)
    assert r.status_code == 200, r.text
    assert picture_host.paths == ["/x.png"]
    # the same picture sent inline: the same answer
    inline = post(remote_server, ask(image_part(data_url(encoded(picture(0))))), logprobs=True)
    assert logprobs_of(inline.json()) == pytest.approx(logprobs_of(r.json()), abs=1e-4)
    assert_refused(post(remote_server, ask(image_part(picture_host.url + "/big.png"))), "messages[0].content[0]",
                   f"is larger than the limit of {REMOTE_LIMIT} bytes")
    assert_refused(post(remote_server, ask(image_part(picture_host.url + "/gone.png"))), "messages[0].content[0]",
                   "could not fetch", "404")
    start = time.monotonic()
    assert_refused(post(remote_server, ask(image_part(picture_host.url + "/slow.png"))), "messages[0].content[0]",
                   "could not fetch", "timed out")
    assert time.monotonic() - start < 2.9  # the 1 s timeout, not the host's 3 s
    # even with fetching on, local files stay off
    assert_refused(post(remote_server, ask(image_part("/etc/passwd"))), "messages[0].content[0]",
                   "local files are not allowed here")
    assert_healthy(remote_server)


def test_serve_takes_the_policy_from_its_arguments(vision_folder, media_dir, picture_host, monkeypatch, capsys):
    """serve() itself (uvicorn.run replaced by requests against the app it was given)."""
    import uvicorn

    qwen35_log = logging.getLogger("qwen35")  # serve() sets up qwen35's logging: undone after the test
    monkeypatch.setattr(qwen35_log, "handlers", list(qwen35_log.handlers))
    monkeypatch.setattr(qwen35_log, "level", qwen35_log.level)
    seen = {}

    def run(app, **kwargs) -> None:
        running = _start(app)
        srv = next(running)
        try:
            seen["data"] = post(srv, ask(image_part(data_url(encoded(picture(0)))))).status_code
            seen["inside"] = post(srv, ask(image_part(str(media_dir / "inside.png")))).status_code
            seen["outside"] = post(srv, ask(image_part(str(media_dir.parent / "outside.png")))).json()["error"]
            seen["remote"] = post(srv, ask(image_part(picture_host.url + "/x.png"))).json()["error"]
        finally:
            running.close()

    monkeypatch.setattr(uvicorn, "run", run)
    serve(vision_folder, served_model_name=NAME, dtype="float32", allowed_local_media_path=media_dir,
          log_level="warning")
    assert seen["data"] == 200 and seen["inside"] == 200
    assert "outside the allowed media folder" in seen["outside"]["message"]
    assert "remote URLs are not fetched here" in seen["remote"]["message"] and picture_host.connections == 0
    assert f"images and videos: data: URLs, files in {media_dir.resolve()})" in capsys.readouterr().out


def test_media_policy_settings(tmp_path):
    assert media_policy() == MediaPolicy(allow_local=False, allow_remote=False)
    policy = media_policy(tmp_path, allow_remote_media=True, media_fetch_timeout_s=3, max_image_pixels=1000)
    assert (policy.allow_local, policy.local_root, policy.allow_remote) == (True, tmp_path.resolve(), True)
    assert (policy.remote_timeout_s, policy.limits.max_image_pixels) == (3, 1000)
    with pytest.raises(ValueError, match="--allowed-local-media-path.*missing is not a folder"):
        media_policy(tmp_path / "missing")
    with pytest.raises(ValueError, match="--media-fetch-timeout"):
        media_policy(media_fetch_timeout_s=float("nan"))


def test_openapi_lists_the_picture_parts(vision_server):
    doc = httpx.get(vision_server.url + "/openapi.json", timeout=10).json()
    body = doc["components"]["schemas"]["ChatCompletionRequest"]
    parts = body["properties"]["messages"]["items"]["properties"]["content"]["anyOf"][2]["items"]["anyOf"]
    kinds = [p["properties"]["type"].get("const") or p["properties"]["type"].get("enum") for p in parts]
    assert kinds == ["text", "image_url", "video_url", ["image", "video"]]
    assert "--allowed-local-media-path" in str(parts[1])
