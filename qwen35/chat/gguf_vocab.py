"""A GGUF's tokenizer metadata -> the tokenizer files of a checkpoint folder.

A GGUF carries llama.cpp's form of the tokenizer: ``tokenizer.ggml.model`` ("gpt2": byte-level BPE),
``tokenizer.ggml.pre`` (the pre-tokenizer's name), ``tokenizer.ggml.tokens`` / ``token_type`` (one entry per
vocabulary row), ``tokenizer.ggml.merges`` ("left right" strings in priority order), the special token ids and
``tokenizer.chat_template``.  :func:`write_tokenizer_files` turns them back into what a checkpoint folder holds --
``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` and a ``generation_config.json`` with the stop
ids -- so :class:`qwen35.chat.Tokenizer` (and transformers) load a GGUF's tokenizer like any other.

How the token types map back (llama.cpp's converter made them from the added-token table):

* NORMAL       -> the BPE vocabulary (its ids kept: the vocabulary may have gaps where added tokens sit);
* CONTROL      -> an added *special* token (``<|im_start|>``, ``<|endoftext|>`` ...: dropped by skip_special_tokens);
* USER_DEFINED -> an added token that is not special (``<think>``, ``<tool_call>`` ...: kept when decoding, so the
  reasoning and tool-call parsers still see them);
* UNUSED       -> a padding row of the embedding (``[PAD248077]`` ...): no token.

The pipeline around the BPE model is Qwen3.5's (NFC, its pre-tokenizer regex, byte-level mapping), the one
llama.cpp's ``qwen35`` pre-tokenizer implements; files with another pre-tokenizer are refused by name.  Merges are
applied as llama.cpp applies them for ``qwen35`` (``ignore_merges`` off), so the ids are those llama.cpp gives.

The metadata comes as a mapping (key -> value, arrays as lists); ``qwen35.quant.gguf.read_gguf_metadata`` reads it
from a file.  This module never imports the model side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .qwen_vocab import MODEL_MAX_LENGTH, set_qwen35_pipeline
from .tokenizer import TokenizerError

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "write_tokenizer_files"]

SUPPORTED_PRE_TOKENIZERS = ("qwen35",)
# llama.cpp's llama_token_type
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# GGUF special-id keys -> tokenizer_config.json names ("seperator" is llama.cpp's spelling)
_SPECIAL_KEYS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token",
                 "seperator": "sep_token", "mask": "mask_token"}


def _require(meta: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in meta:
        raise TokenizerError(f"GGUF metadata has no {key!r}: the file carries no tokenizer")
    value = meta[key]
    if not isinstance(value, kind):
        raise TokenizerError(f"GGUF metadata {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


# end-of-generation tokens llama.cpp recognises by their text besides the eos id (llama-vocab.cpp's EOG list, the
# entries a Qwen vocabulary has): a chat turn ends with <|im_end|>, a document with <|endoftext|>
_END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>")
# general.sampling.* keys (llama.cpp's recommended sampler settings) -> generation_config.json names
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                  "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def _generation_config(metadata: Mapping[str, Any], tokens: list[str], types: list[int],
                       added: dict[int, str]) -> dict[str, Any]:
    """Stop ids and sampling defaults: the eos id plus the end-of-generation tokens llama.cpp stops on, and the
    file's general.sampling.* values when it has them."""
    stops = []
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, int) and not isinstance(eos, bool):
        stops.append(eos)
    for idx, text in added.items():
        if text in _END_OF_GENERATION and idx not in stops:
            stops.append(idx)
    gen: dict[str, Any] = {"eos_token_id": stops}
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool):
        gen["pad_token_id"] = pad
    for key, name in _SAMPLING_KEYS.items():
        value = metadata.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gen[name] = value
    return gen


def write_tokenizer_files(metadata: Mapping[str, Any], folder: str | os.PathLike[str],
                          model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json`` (stop ids, and sampling
    defaults when the GGUF has general.sampling.* keys) and (when the GGUF has one) ``chat_template.jinja`` into
    ``folder`` from a GGUF's metadata; returns the path of ``tokenizer.json``.  ``model_max_length`` (default:
    262,144, Qwen3.5's context) goes into tokenizer_config.json.  TokenizerError names what is missing or not a
    Qwen3.5 byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    kind = _require(metadata, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer.ggml.model is {kind!r}; qwen35 reads byte-level BPE ('gpt2') "
                             "vocabularies, which Qwen3.5 uses")
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise TokenizerError(f"GGUF tokenizer.ggml.pre is {pre!r}; qwen35 rebuilds the "
                             f"{', '.join(SUPPORTED_PRE_TOKENIZERS)} pre-tokenizer only")
    tokens = _require(metadata, "tokenizer.ggml.tokens", list)
    types = _require(metadata, "tokenizer.ggml.token_type", list)
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    merges_text = metadata.get("tokenizer.ggml.merges") or []

    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    for idx, (text, t) in enumerate(zip(tokens, types)):
        if t == TOKEN_NORMAL:
            if text in vocab:
                raise TokenizerError(f"GGUF token {text!r} appears twice (ids {vocab[text]} and {idx})")
            vocab[text] = idx
        elif t in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append({"id": idx, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t == TOKEN_CONTROL})
        elif t != TOKEN_UNUSED:
            raise TokenizerError(f"GGUF token {idx} ({text!r}) has type {t} (unknown / byte tokens), which a "
                                 "byte-level BPE vocabulary does not use")
    merges = []
    for m in merges_text:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"GGUF merge {m!r} is not 'left right'")
        merges.append((left, right))

    # the tokenizers library numbers added tokens after the model's vocabulary, in order, unless the vocabulary already
    # holds them: when the file's ids do not follow that rule (rows left empty in between), the added tokens go into
    # the vocabulary too, at their ids (they are split off before BPE runs, so this changes no tokenisation)
    if [a["id"] for a in added] != list(range(len(vocab), len(vocab) + len(added))):
        vocab.update({a["content"]: a["id"] for a in added})
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    set_qwen35_pipeline(tok)
    body = json.loads(tok.to_str())
    body["added_tokens"] = added  # explicit ids: added tokens need not follow the vocabulary contiguously

    by_id = {a["id"]: a["content"] for a in added}

    def name_of(key: str) -> str | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        if value in by_id:
            return by_id[value]
        if 0 <= value < len(tokens) and types[value] != TOKEN_UNUSED:
            return tokens[value]
        raise TokenizerError(f"GGUF tokenizer.ggml.{key}_token_id is {value}, which names no token")

    config: dict[str, Any] = {
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length or MODEL_MAX_LENGTH,
        "split_special_tokens": False,
        # transformers keeps the Qwen3.5 regex with this class (Qwen2's would rebuild the older pattern)
        "tokenizer_class": "Qwen3_5Tokenizer",
    }
    for key, field in _SPECIAL_KEYS.items():
        config[field] = name_of(key)

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(metadata, tokens, types, by_id),
                                                           indent=2) + "\n", encoding="utf-8")

    # the ids the file was read with must be the ids the written tokenizer gives
    check = HFTokenizer.from_file(str(path))
    for a in added:
        if check.token_to_id(a["content"]) != a["id"]:
            raise TokenizerError(f"added token {a['content']!r} got id {check.token_to_id(a['content'])} in the "
                                 f"written tokenizer.json, expected {a['id']}")
    return path
