"""A tiny byte-level tokenizer (ids 0..255 are the bytes) with a few Qwen added tokens."""

from __future__ import annotations

from pathlib import Path

from qwen35.chat.qwen_vocab import NON_SPECIAL_ADDED_TOKENS
from qwen35.chat.tokenizer import _gpt2_byte_decoder

TINY_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]


def write_tiny_tokenizer(folder: Path) -> Path:
    """A 256-byte byte-level BPE (no merges) plus a few Qwen added tokens, ids 256.."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Number the 256 byte symbols by byte value so that id == byte, which keeps tests readable.
    byte_of = _gpt2_byte_decoder()
    vocab = {ch: byte_of[ch] for ch in alphabet}
    tok = HFTokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t not in NON_SPECIAL_ADDED_TOKENS, normalized=False) for t in TINY_ADDED])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


TINY_IDS = {name: 256 + i for i, name in enumerate(TINY_ADDED)}
