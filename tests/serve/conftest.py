"""A real server on a loopback port, over a tiny random model and a byte-level tokenizer.

The model is random, so its text is noise: tests check the API's plumbing (formats, streaming equals
non-streaming, errors, aborts), and the parsing of reasoning and tool calls is tested with fixed outputs in
tests/chat/test_completion.py.  The server runs in a background thread of the test process, so tests can also
look at the engine directly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.chat.tiny_tokenizer import TINY_IDS, write_tiny_tokenizer  # noqa: E402

MODEL_NAME = "tiny-qwen35"
API_KEY = "sk-test-key"
MAX_BODY_BYTES = 256 * 1024
MAX_TOKENS_CAP = 1024


def build_checkpoint(folder: Path) -> Path:
    """Byte tokenizer (256 bytes + 7 Qwen tokens) and a 4-layer random model whose vocabulary matches it."""
    import qwen35
    from qwen35.config import config_from_dict
    from tests.engine.conftest import BASE

    write_tiny_tokenizer(folder)
    vocab = 256 + len(TINY_IDS)
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, vocab_size=vocab,
                                eos_token_id=TINY_IDS["<|im_end|>"]))
    torch.manual_seed(0)
    model = qwen35.model.Qwen35ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        # clear gaps between logits: greedy choices do not flip with the batch composition
        model.lm_head.weight.mul_(6)
        # keep end-of-turn rare so that answers have some length
        model.lm_head.weight[TINY_IDS["<|im_end|>"]] = 0
        model.lm_head.weight[TINY_IDS["<|endoftext|>"]] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))


@pytest.fixture(scope="session")
def llm(checkpoint: Path):
    import qwen35

    return qwen35.LLM(checkpoint, dtype="float32", max_num_seqs=16, max_num_batched_tokens=1024)


@pytest.fixture(scope="session")
def async_llm(llm):
    from qwen35.engine import AsyncLLM

    engine = AsyncLLM(llm.engine)
    yield engine
    engine.shutdown()


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: object

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def _start(app) -> Iterator[RunningServer]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def server(async_llm) -> Iterator[RunningServer]:
    from qwen35.serve import create_app

    app = create_app(async_llm, MODEL_NAME, max_body_bytes=MAX_BODY_BYTES, max_tokens_cap=MAX_TOKENS_CAP)
    yield from _start(app)


@pytest.fixture(scope="session")
def secured_server(async_llm) -> Iterator[RunningServer]:
    """A second server on the same engine, with an API key."""
    from qwen35.serve import create_app

    yield from _start(create_app(async_llm, MODEL_NAME, api_key=API_KEY))


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {'name{labels}': value}."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_idle(url: str, timeout: float = 15.0) -> dict[str, float]:
    """Poll /metrics until no sequence runs or waits and no cache is held; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (m["qwen35_num_requests_running"] == 0 and m["qwen35_num_requests_waiting"] == 0
                and m["qwen35_kv_cache_blocks_used"] == 0 and m["qwen35_state_slots_used"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def chat_body(**fields) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
            "temperature": 0}
    body.update(fields)
    return body

