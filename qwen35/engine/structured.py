"""Grammar-constrained decoding: a per-sequence token mask from a grammar, backed by ``llguidance``.

A request's :class:`~qwen35.engine.params.StructuredSpec` is compiled once per distinct spec (an LRU cache of
compiled matchers in their start state) into an ``llguidance.LLMatcher`` over the engine's tokenizer; every
sequence of the request gets its own copy.  Each step the engine asks every constrained sequence for the set of
tokens that keep the output inside the grammar (:meth:`StructuredCompiler.allowed_mask`), the sampler masks the
rest, and the sampled token advances the matcher (:meth:`GrammarMatcher.advance`).  When the grammar cannot be
extended any further the sequence ends (finish_reason "stop").

The matcher's state is a function of the sequence's generated tokens alone, so preemption (which drops the cache
and recomputes from the tokens) leaves it valid; :meth:`GrammarMatcher.sync` rebuilds it from the tokens should
the two ever disagree.

``llguidance`` is optional: importing this module never needs it, and a request with a spec but without the
library fails with a ``ValueError`` saying what to install.

Token bytes: llguidance reads every token as bytes.  Its own reader of a HF tokenizer.json takes any added token
that looks like a tag (``</think>``, ``<tool_call>``, ``</parameter>``) for a special token, which a grammar's
text cannot match, so a model that writes ``</parameter>`` as its one added token could never close a parameter.
Built from the engine's tokenizer instead, only the tokenizer's *special* tokens (``<|im_end|>``...) are special,
and the tag tokens are the text they decode to, exactly as the chat layer's parsers see them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .params import StructuredSpec

INSTALL_HINT = "pip install 'qwen35[structured]'"

# JSON is written in one layout, ``{"a": 1, "b": [2, 3]}`` (Python's json.dumps, and the chat template's tojson):
# with free whitespace between tokens a model that does not know the format fills the gaps with spaces and
# newlines until max_tokens (measured: most samples of the embedded model at temperature 1 did).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Line breaks allowed between the ``after`` trigger and the grammar (the template writes "</think>\n\n").
AFTER_WHITESPACE = r"(\r?\n){0,2}"
CACHE_SIZE = 128  # compiled grammars kept (per engine)
_WHAT = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "lark": "Lark grammar",
         "regex": "regex"}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError(f"structured output needs the llguidance package, which is not installed: "
                         f"{INSTALL_HINT}") from None
    return llguidance


def available() -> bool:
    """Whether structured output can be used here (llguidance importable)."""
    try:
        _llguidance()
    except ValueError:
        return False
    return True


def _short(message: str, limit: int = 400) -> str:
    """llguidance errors can carry the parser state and the whole grammar: keep the first lines."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    text = " ".join(lines[:3]) if lines else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def _lark_regex(text: str) -> str:
    """``text`` as a Lark ``/.../`` regex matching it literally."""
    out = []
    for ch in text:
        if ch.isalnum() or ch in " _":
            out.append(ch)
        elif ch == "\n":
            out.append(r"\n")
        elif ch == "\t":
            out.append(r"\t")
        elif ch == "\r":
            out.append(r"\r")
        elif ch in _REGEX_META:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


# =============================================================================================
# the tokenizer as llguidance sees it


class _TokenizerView:
    """What ``llguidance.TokenizerWrapper`` reads: every token's bytes, the special ids, and an encoder."""

    def __init__(self, tokenizer: Any, token_bytes: list[bytes], eos_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        special = set(getattr(tokenizer, "special_token_ids", ()) or ())
        # An id with no bytes (a hole in the vocabulary) can never be text: treat it as special.
        special.update(i for i, b in enumerate(token_bytes) if not b)
        self.tokens = list(token_bytes)
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = None

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text))


def _ll_tokenizer(llg: Any, tokenizer: Any, eos_ids: list[int]) -> Any:
    table = getattr(tokenizer, "_token_bytes", None)
    token_bytes = table() if callable(table) else None
    if token_bytes is not None:
        view = _TokenizerView(tokenizer, token_bytes, eos_ids)
        return llg.LLTokenizer(llg.TokenizerWrapper(view), n_vocab=len(token_bytes), eos_token=eos_ids)
    hf = getattr(tokenizer, "_tk", None)  # not byte-level: let llguidance read the tokenizer.json itself
    if hf is not None and hasattr(hf, "to_str"):
        return llg.LLTokenizer(hf.to_str(), n_vocab=len(tokenizer), eos_token=eos_ids)
    raise ValueError("structured output needs the engine's tokenizer to expose its token bytes "
                     "(qwen35.chat.Tokenizer does)")


# =============================================================================================
# compiled grammars and per-sequence matchers


@dataclass
class CompiledGrammar:
    spec: StructuredSpec
    grammar: str  # what llguidance compiled (its JSON grammar form)
    template: Any  # LLMatcher in its start state; sequences get deep copies
    compile_seconds: float


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, compiled: CompiledGrammar) -> None:
        self._m = matcher
        self.compiled = compiled
        self.consumed = 0  # tokens advanced through (the sequence's output_ids so far)
        self.error: str | None = None

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing more can be added (also after an error)."""
        return self.error is not None or self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refused it (then :attr:`error` says why)."""
        self.consumed += 1
        if self.error is not None:
            return False
        if not self._m.consume_token(int(token)):
            self.error = _short(self._m.get_error() or f"token {token} is not allowed here")
            return False
        return True

    def sync(self, output_ids: list[int]) -> None:
        """Make the state that of ``output_ids`` (replayed from the start if they disagree)."""
        if self.consumed == len(output_ids):
            return
        self._m.reset()
        self.consumed, self.error = 0, None
        for t in output_ids:
            self.advance(t)  # after a refusal the rest only counts (the error stays)

    def _fill(self, row: torch.Tensor) -> None:
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class StructuredCompiler:
    """Compiles specs for one tokenizer (cached) and computes the batch's token masks.

    Thread-safe: the server compiles a request's spec on a worker thread to refuse a bad schema before it
    answers, while the engine thread compiles and copies for the requests it admits.
    """

    def __init__(self, tokenizer: Any, eos_ids: list[int] | frozenset[int], cache_size: int = CACHE_SIZE) -> None:
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer (this engine has none)")
        self._llg = _llguidance()
        eos = sorted(eos_ids)
        if not eos:
            raise ValueError("structured output needs an end-of-sequence token id (the tokenizer lists none)")
        start = time.perf_counter()
        self._tok = _ll_tokenizer(self._llg, tokenizer, eos)
        self.tokenizer_seconds = time.perf_counter() - start
        self.vocab_size: int = self._tok.vocab_size
        self.words = (self.vocab_size + 31) // 32
        self._cache: OrderedDict[StructuredSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._bits = torch.arange(32, dtype=torch.int32)
        # measurements: how long compiling and masking take (read by tests and benchmarks)
        self.compiles = 0
        self.compile_seconds = 0.0
        self.mask_rows = 0
        self.mask_seconds = 0.0

    # -- compiling ----------------------------------------------------------------------------------------
    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec`` (cached); ``ValueError`` naming the problem if it does not compile."""
        if not isinstance(spec, StructuredSpec):
            raise TypeError(f"spec must be a StructuredSpec, got {type(spec).__name__}")
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        start = time.perf_counter()
        grammar = self._grammar(spec)
        matcher = self._llg.LLMatcher(self._tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured: the {_WHAT[spec.kind]} cannot be used: {_short(matcher.get_error())}")
        compiled = CompiledGrammar(spec, grammar, matcher, time.perf_counter() - start)
        with self._lock:
            self.compiles += 1
            self.compile_seconds += compiled.compile_seconds
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredSpec) -> GrammarMatcher:
        compiled = self.compile(spec)
        with self._lock:  # the template is shared between threads: copy it under the lock
            copy = compiled.template.deep_copy()
        return GrammarMatcher(copy, compiled)

    def _grammar(self, spec: StructuredSpec) -> str:
        """llguidance's grammar text for a spec: the body, wrapped behind the ``after`` trigger if any."""
        M = self._llg.LLMatcher
        if spec.kind in ("json_schema", "json_object"):
            value = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
            options = {**JSON_LAYOUT, "lenient": not spec.strict}
            try:
                body = M.grammar_from_json_schema(value, defaults=options)
            except ValueError as e:
                raise ValueError(f"structured: the JSON schema cannot be used: {_short(str(e))}") from None
        elif spec.kind == "lark":
            body = M.grammar_from_lark(spec.value)
        else:
            body = M.grammar_from_regex(spec.value)
        if spec.after is None:
            return body
        # Free text that holds neither the trigger nor an excluded string, the trigger, line breaks, then the
        # body as a sub-grammar.  The free text cannot run past the first trigger, so the one lexeme has one
        # end.  Being one grammar, it also handles a token that ends the trigger and begins the body: the bytes
        # after the trigger are checked like any others.
        sub = json.loads(body)["grammars"][0]
        sub["name"] = "body"
        banned = "|".join(_lark_regex(x) for x in (spec.after, *spec.after_excludes))
        wrapper = (f"start: BEFORE /{AFTER_WHITESPACE}/ @body\n"
                   f"BEFORE: (/(?s:.*)/ & ~/(?s:.*)(?:{banned})(?s:.*)/) /{_lark_regex(spec.after)}/\n")
        return json.dumps({"grammars": [{"lark_grammar": wrapper}, sub]})

    # -- masks --------------------------------------------------------------------------------------------
    def allowed_mask(self, matchers: list[GrammarMatcher | None]) -> torch.Tensor:
        """bool ``[len(matchers), vocab_size]``: what each row's grammar allows next (rows with None: all)."""
        start = time.perf_counter()
        rows = [(i, m) for i, m in enumerate(matchers) if m is not None]
        bitmask = torch.empty((len(rows), self.words), dtype=torch.int32)
        # One row after the other: llguidance's parallel executor was slower here (2 cores, where its threads
        # compete with torch's), and one mask takes tens of microseconds (a few hundred at Qwen's 248k vocab).
        for j, (_, m) in enumerate(rows):
            if m.error is not None:
                bitmask[j] = 0
            else:
                m._fill(bitmask[j])
        unpacked = unpack_bitmask(bitmask, self._bits)[:, : self.vocab_size]
        for j, (_, m) in enumerate(rows):
            if m.error is not None:  # a broken matcher (the engine ends its sequence) allows only the end
                unpacked[j, [t for t in self._tok.eos_tokens if t < self.vocab_size]] = True
        if len(rows) == len(matchers):
            allowed = unpacked
        else:  # only the constrained rows are unpacked (0.3 ms a row at 248k tokens); the others allow all
            allowed = torch.ones((len(matchers), self.vocab_size), dtype=torch.bool)
            allowed[torch.tensor([i for i, _ in rows], dtype=torch.long)] = unpacked
        self.mask_rows += len(rows)
        self.mask_seconds += time.perf_counter() - start
        return allowed

    def stats(self) -> dict[str, float]:
        return {"compiles": self.compiles, "compile_seconds": self.compile_seconds,
                "mask_rows": self.mask_rows, "mask_seconds": self.mask_seconds,
                "tokenizer_seconds": self.tokenizer_seconds}


def unpack_bitmask(bitmask: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[B, W]`` (bit j of word w = token 32w + j) -> bool ``[B, 32W]``."""
    if bits is None:
        bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
