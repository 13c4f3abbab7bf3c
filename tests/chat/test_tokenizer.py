"""Tokenizer loading, special ids, stop ids, chat-template lookup and incremental decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen35.chat import IncrementalDecoder, Tokenizer, TokenizerError, default_template_source
from .tiny_tokenizer import TINY_ADDED, TINY_IDS


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# ------------------------------------------------------------------ ids by name


def test_special_ids_by_name(qwen_tok):
    assert qwen_tok.im_start_id == 248045
    assert qwen_tok.im_end_id == 248046
    assert qwen_tok.endoftext_id == 248044
    assert qwen_tok.special_id("<think>") == 248068
    assert qwen_tok.special_id("</think>") == 248069
    assert qwen_tok.special_id("<tool_call>") == 248058
    assert qwen_tok.special_id("<|image_pad|>") == 248056
    assert qwen_tok.token_to_id("<|video_pad|>") == 248057
    assert qwen_tok.id_to_token(248076) == "<|audio_pad|>"
    assert qwen_tok.pad_token_id == 248044
    with pytest.raises(KeyError, match="<nope>"):
        qwen_tok.special_id("<nope>")


def test_tiny_tokenizer_bytes_are_ids(tiny_dir):
    tok = Tokenizer(tiny_dir)
    assert tok.encode("Hi<|im_end|>") == [ord("H"), ord("i"), TINY_IDS["<|im_end|>"]]
    assert tok.decode([ord("H"), ord("i")]) == "Hi"


# ------------------------------------------------------------------ stop ids


def test_stop_ids_are_the_union_of_all_configs(tiny_dir):
    _write_json(tiny_dir / "config.json", {"eos_token_id": 1, "text_config": {"eos_token_id": [2, 3]}})
    _write_json(tiny_dir / "generation_config.json", {"eos_token_id": [4, TINY_IDS["<|endoftext|>"]], "top_k": 20})
    _write_json(tiny_dir / "tokenizer_config.json", {"eos_token": {"content": "<think>", "special": False}})
    tok = Tokenizer(tiny_dir)
    assert tok.stop_token_ids == {1, 2, 3, 4, TINY_IDS["<|endoftext|>"], TINY_IDS["<think>"], TINY_IDS["<|im_end|>"]}
    assert tok.generation_config["top_k"] == 20


def test_im_end_is_always_a_stop_id(tiny_dir):
    # Small checkpoints carry a scalar eos of <|endoftext|> only.
    _write_json(tiny_dir / "generation_config.json", {"eos_token_id": TINY_IDS["<|endoftext|>"]})
    tok = Tokenizer(tiny_dir)
    assert tok.stop_token_ids == {TINY_IDS["<|endoftext|>"], TINY_IDS["<|im_end|>"]}


def test_real_stop_ids(qwen_tokenizer_dir, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(qwen_tokenizer_dir / name)
    assert Tokenizer(folder).stop_token_ids == {248046}
    _write_json(folder / "generation_config.json", {"eos_token_id": [248046, 248044]})
    assert Tokenizer(folder).stop_token_ids == {248046, 248044}


# ------------------------------------------------------------------ files and errors


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        Tokenizer(tmp_path)


def test_invalid_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer(tmp_path)


def test_invalid_config_json_names_the_file(tiny_dir):
    (tiny_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"generation_config\.json: not valid JSON"):
        Tokenizer(tiny_dir)


def test_tokenizer_json_path_is_accepted(tiny_dir):
    assert Tokenizer(tiny_dir / "tokenizer.json").path == tiny_dir


def test_added_tokens_from_tokenizer_config(tiny_dir):
    next_id = 256 + len(TINY_ADDED)
    _write_json(tiny_dir / "tokenizer_config.json", {"added_tokens_decoder": {
        str(TINY_IDS["<|im_end|>"]): {"content": "<|im_end|>", "special": True},
        str(next_id): {"content": "<extra>", "special": True},
    }})
    tok = Tokenizer(tiny_dir)
    assert tok.special_id("<extra>") == next_id
    assert next_id in tok.special_token_ids
    _write_json(tiny_dir / "tokenizer_config.json", {"added_tokens_decoder": {
        "5": {"content": "<|im_end|>", "special": True},
    }})
    with pytest.raises(TokenizerError, match="has id 5 there but"):
        Tokenizer(tiny_dir)


def test_chat_template_lookup_order(tiny_dir):
    assert Tokenizer(tiny_dir).chat_template is None
    _write_json(tiny_dir / "tokenizer_config.json", {"chat_template": "from-config"})
    assert Tokenizer(tiny_dir).chat_template == "from-config"
    _write_json(tiny_dir / "tokenizer_config.json",
                {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]})
    assert Tokenizer(tiny_dir).chat_template == "d"
    _write_json(tiny_dir / "chat_template.json", {"chat_template": "from-json"})
    assert Tokenizer(tiny_dir).chat_template == "from-json"
    (tiny_dir / "chat_template.jinja").write_text("from-jinja")
    assert Tokenizer(tiny_dir).chat_template == "from-jinja"


def test_apply_chat_template_uses_checkpoint_template_or_ours(tiny_dir):
    messages = [{"role": "user", "content": "Hi"}]
    tok = Tokenizer(tiny_dir)
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    (tiny_dir / "chat_template.jinja").write_text("{{ messages[0].content }}|{{ enable_thinking }}")
    assert Tokenizer(tiny_dir).apply_chat_template(messages, enable_thinking=False) == "Hi|False"


def test_builder_template_is_the_shipped_one(qwen_tok):
    assert qwen_tok.chat_template == default_template_source()


# ------------------------------------------------------------------ incremental decoding

STREAM_TEXT = (
    "Plain ascii, then 中文：通义千问的推理引擎。 Emoji 🦙🚀👨‍👩‍👧‍👦🏳️‍🌈 and rare CJK 𠀀𪚥龘 "
    "<think>\nreasoning\n</think>\n\nAnswer ✅ ☕️ ñ é"
)


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.step(t) for t in ids] + [decoder.finish()]


def test_incremental_deltas_are_whole_characters(qwen_tok):
    ids = qwen_tok.encode("<|im_start|>assistant\n" + STREAM_TEXT + "<|im_end|>")
    # The sample must really split characters across tokens, or the test proves nothing.
    table = qwen_tok._token_bytes()
    assert table is not None

    def _is_valid_utf8(chunk: bytes) -> bool:
        try:
            chunk.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert sum(not _is_valid_utf8(table[t]) for t in ids) >= 5
    for skip in (False, True):
        deltas = _stream(qwen_tok.incremental_decoder(skip_special_tokens=skip), ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "" in deltas[:-1]  # some token completed no character and was held back
        assert "".join(deltas) == qwen_tok.decode(ids, skip_special_tokens=skip)


def test_incremental_decoder_flushes_an_unfinished_character(qwen_tok):
    # "𪚥" is four byte-tokens; generation stopping after three of them leaves a broken character.
    ids = qwen_tok.encode("ok 𪚥")
    assert len(ids) == 6
    deltas = _stream(qwen_tok.incremental_decoder(), ids[:-1])
    assert deltas == ["ok", " ", "", "", "", "\ufffd"]
    assert "".join(deltas) == qwen_tok.decode(ids[:-1])


def test_incremental_decoder_on_raw_bytes(tiny_dir):
    # With the tiny tokenizer ids are bytes, so a character can be split anywhere.
    tok = Tokenizer(tiny_dir)
    text = "a🦙中é"
    ids = list(text.encode("utf-8"))
    decoder = tok.incremental_decoder()
    deltas = [decoder.step(i) for i in ids]
    assert deltas == ["a", "", "", "", "🦙", "", "", "中", "", "é"]
    assert decoder.finish() == ""
    cut = tok.incremental_decoder()
    assert cut.feed(ids[:3]) == "a" and cut.finish() == "\ufffd" == tok.decode(ids[1:3])


def test_incremental_decoder_fallback_for_non_byte_level(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import WordPiece

    vocab = {"[UNK]": 0, "hello": 1, "wor": 2, "##ld": 3, "!": 4}
    hf = HFTokenizer(WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.WordPiece()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = tok.encode("hello world !")
    assert ids == [1, 2, 3, 4]
    deltas = _stream(tok.incremental_decoder(), ids)
    assert "".join(deltas) == tok.decode(ids)


def test_token_bytes_with_holes_in_the_ids(tmp_path):
    # A vocabulary rebuilt from a GGUF can skip ids (unused slots): the byte table is sized by the largest id
    # and the ids after a hole keep their own bytes.
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from qwen35.chat.tokenizer import _gpt2_byte_decoder

    byte_of = _gpt2_byte_decoder()
    vocab = {ch: byte_of[ch] for ch in pre_tokenizers.ByteLevel.alphabet()}
    vocab["Hi"] = 300  # 256..299 unused
    tok = HFTokenizer(BPE(vocab=vocab, merges=[("H", "i")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer(tmp_path)
    table = ours._token_bytes()
    im_end = ours.token_to_id("<|im_end|>")
    assert len(ours) < 300 < len(table) == 301  # the id count is below the largest id
    assert table[300] == b"Hi" and table[ord("x")] == b"x" and table[im_end] == b"<|im_end|>"
    assert table[280] == b""  # a hole
    assert ours.encode("Hi") == [300]
