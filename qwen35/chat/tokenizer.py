"""Tokenizer of a checkpoint folder, plus streaming-safe incremental detokenisation.

A checkpoint folder holds the pieces that together define how text becomes ids and back:

* ``tokenizer.json``          the fast tokenizer (vocabulary, merges, normaliser, added tokens); required
* ``tokenizer_config.json``   added-token table, eos token name, sometimes the chat template
* ``chat_template.jinja``     the chat template (wins over one embedded elsewhere)
* ``generation_config.json``  eos ids and sampling defaults
* ``config.json``             more eos ids (top level and ``text_config``)

Checkpoints disagree about which eos ids they list (a small model may carry only
``<|endoftext|>``), so generation stops on the *union* of all of them plus ``<|im_end|>``: a chat
turn always ends with ``<|im_end|>`` and missing it makes the model run on into a new turn.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["IncrementalDecoder", "Tokenizer", "TokenizerError"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable; the message names the file."""


def _read_json(path: Path, *, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return data


def _eos_ids(value: Any) -> list[int]:
    """eos_token_id fields are an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_text(value: Any) -> str | None:
    """Token names in tokenizer_config.json are strings or AddedToken-like dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode alphabet used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    decoder: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            decoder[chr(byte)] = byte
        else:
            decoder[chr(0x100 + shifted)] = byte
            shifted += 1
    return decoder


class Tokenizer:
    """Text <-> token ids for one checkpoint folder (or a path to its ``tokenizer.json``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        folder = path.parent if path.is_file() else path
        tokenizer_file = path if path.is_file() else folder / "tokenizer.json"
        self.path = folder
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: file not found (a checkpoint needs a tokenizer.json)")
        try:
            self._tk = _HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{tokenizer_file}: not a valid tokenizer.json ({exc})") from exc

        self.tokenizer_config: dict[str, Any] = _read_json(folder / "tokenizer_config.json") or {}
        self.generation_config: dict[str, Any] = _read_json(folder / "generation_config.json") or {}
        self.model_config: dict[str, Any] = _read_json(folder / "config.json") or {}
        self._add_configured_tokens(folder / "tokenizer_config.json")

        added = self._tk.get_added_tokens_decoder()
        self.added_tokens: dict[str, int] = {tok.content: idx for idx, tok in added.items()}
        # Only "special" added tokens are dropped by skip_special_tokens; the think / tool tags
        # are added but not special, so reasoning and tool parsers still see them.
        self.special_token_ids: frozenset[int] = frozenset(idx for idx, tok in added.items() if tok.special)
        self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = self._find_chat_template(folder)
        self.stop_token_ids: frozenset[int] = frozenset(self._collect_stop_ids())
        self._byte_table: list[bytes] | None = None

    # ---------------------------------------------------------------- loading helpers

    def _add_configured_tokens(self, config_file: Path) -> None:
        """Added tokens listed in tokenizer_config.json but absent from tokenizer.json are added,
        as transformers does; an id clash means the two files disagree and is an error."""
        table = self.tokenizer_config.get("added_tokens_decoder")
        if not isinstance(table, dict):
            return
        for key, entry in sorted(table.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
            content = _token_text(entry)
            if content is None or not str(key).isdigit():
                raise TokenizerError(f"{config_file}: added_tokens_decoder entry {key!r} is malformed")
            existing = self._tk.token_to_id(content)
            if existing is None:
                special = bool(entry.get("special", True)) if isinstance(entry, dict) else True
                self._tk.add_tokens([AddedToken(content, special=special, normalized=False)])
                existing = self._tk.token_to_id(content)
            if existing != int(key):
                raise TokenizerError(
                    f"{config_file}: added token {content!r} has id {key} there but {existing} in tokenizer.json"
                )

    def _find_chat_template(self, folder: Path) -> str | None:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        json_file = folder / "chat_template.json"  # processor-style checkpoints
        data = _read_json(json_file)
        if data and isinstance(data.get("chat_template"), str):
            return data["chat_template"]
        embedded = self.tokenizer_config.get("chat_template")
        if isinstance(embedded, str):
            return embedded
        if isinstance(embedded, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in embedded if isinstance(t, dict)}
            chosen = named.get("default") or next(iter(named.values()), None)
            return chosen if isinstance(chosen, str) else None
        return None

    def _collect_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        ids.update(_eos_ids(self.model_config.get("eos_token_id")))
        text_config = self.model_config.get("text_config")
        if isinstance(text_config, dict):
            ids.update(_eos_ids(text_config.get("eos_token_id")))
        ids.update(_eos_ids(self.generation_config.get("eos_token_id")))
        eos_name = _token_text(self.tokenizer_config.get("eos_token"))
        if eos_name is not None and self._tk.token_to_id(eos_name) is not None:
            ids.add(self._tk.token_to_id(eos_name))
        if self._tk.token_to_id(IM_END) is not None:
            ids.add(self._tk.token_to_id(IM_END))
        return ids

    # ---------------------------------------------------------------- encoding / decoding

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; added tokens written in the text (``<|im_start|>``...) become their ids.
        No BOS or other tokens are inserted."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def special_id(self, name: str) -> int:
        """Id of an added token by its text, e.g. ``special_id("<think>")``; KeyError if absent."""
        try:
            return self.added_tokens[name]
        except KeyError:
            raise KeyError(f"tokenizer in {self.path} has no added token {name!r}") from None

    @property
    def im_start_id(self) -> int:
        return self.special_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.special_id(IM_END)

    @property
    def endoftext_id(self) -> int:
        return self.special_id(ENDOFTEXT)

    @property
    def pad_token_id(self) -> int | None:
        name = _token_text(self.tokenizer_config.get("pad_token")) or ENDOFTEXT
        return self._tk.token_to_id(name)

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        enable_thinking: bool | None = True,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render with the checkpoint's chat template, or the project's Qwen3.5 template if the
        checkpoint ships none."""
        from .template import render_chat

        return render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                           add_generation_prompt=add_generation_prompt, template=self.chat_template, **kwargs)

    # ---------------------------------------------------------------- streaming

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _token_bytes(self) -> list[bytes] | None:
        """Raw bytes of every id for byte-level BPE tokenizers (None for other kinds)."""
        if self._byte_table is None:
            if type(self._tk.decoder).__name__ != "ByteLevel":
                return None
            byte_of = _gpt2_byte_decoder()
            vocab = self._tk.get_vocab(with_added_tokens=False)
            # ids need not be contiguous (a vocabulary rebuilt from a GGUF may have holes): size the table by the
            # largest id; a hole reads as no bytes
            size = max([self.vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in self.added_tokens.values())])
            table = [b""] * size
            for token, idx in vocab.items():
                # Every character of a byte-level vocabulary entry stands for one byte.
                table[idx] = bytes(byte_of[ch] for ch in token)
            for content, idx in self.added_tokens.items():
                table[idx] = content.encode("utf-8")  # added tokens are stored as plain text
            self._byte_table = table
        return self._byte_table


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that are always whole UTF-8 characters.

    One emoji or CJK character is often split over several byte-level tokens; emitting each
    token's decode on its own would produce U+FFFD garbage in the middle of a stream.  For
    byte-level tokenizers the bytes of each token go through an incremental UTF-8 decoder that
    holds back an incomplete trailing sequence until it is completed; ``finish()`` flushes what
    is left (an unfinished sequence becomes U+FFFD, as a full ``decode`` would show it).  The
    deltas concatenated equal ``tokenizer.decode(all_ids)``.

    Tokenizers that are not byte-level fall back to re-decoding a short window of recent ids
    and emitting the new suffix once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._skip_special_tokens = skip_special_tokens
        self._bytes = tokenizer._token_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # window state for the fallback path
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        """Feed one id; returns the text that became complete (possibly empty)."""
        if token_id in self._skip:
            return ""
        if self._bytes is not None:
            chunk = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
            return self._utf8.decode(chunk)
        return self._window_step(token_id)

    def feed(self, token_ids: Iterable[int]) -> str:
        """Feed several ids at once (e.g. accepted speculative tokens)."""
        return "".join(self.step(t) for t in token_ids)

    def finish(self) -> str:
        """End of stream: returns whatever was held back."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        tail = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        head = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        self._prefix_offset = self._read_offset = len(self._ids)
        return tail[len(head):]

    def _window_step(self, token_id: int) -> str:
        # Decoding a window that starts a few tokens back lets the tokenizer's decoder apply
        # context-dependent rules (leading-space handling...) the same way a full decode does.
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        head = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special_tokens)
        full = decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(head):]
        return ""
