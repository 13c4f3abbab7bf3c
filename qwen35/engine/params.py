"""Per-request sampling parameters (the OpenAI / vLLM set), validated when built.

Everything a request can get wrong is reported here, as a ``ValueError`` naming the parameter and
the range it may take, so the engine and the server never meet a half-valid request.

:class:`StructuredSpec` describes a grammar constraint (structured output).  It is checked for shape here, with no
grammar library needed; whether the grammar itself compiles is decided by the engine (``engine/structured.py``),
which needs ``llguidance``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by ~0 only overflows, and
# argmax is the limit of sampling as the temperature goes to 0 anyway.
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but ``n=True`` is a mistake, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


STRUCTURED_KINDS = ("json_schema", "json_object", "lark", "regex")


@dataclass(frozen=True)
class StructuredSpec:
    """A grammar the generated text must follow (grammar-constrained decoding).

    ``kind`` and ``value``:

    * ``"json_schema"``: ``value`` is a JSON schema (a dict, or its JSON text); the output is one JSON value
      that validates against it, laid out as ``{"a": 1, "b": [2, 3]}``;
    * ``"json_object"``: any JSON object (``value`` unused);
    * ``"lark"``: ``value`` is a context-free grammar in llguidance's Lark dialect (``start`` is the top rule;
      ``%json {...}`` embeds a JSON schema);
    * ``"regex"``: ``value`` is a regular expression the whole output must match.

    ``after``: the constraint starts only once this text has been generated (and up to two line breaks after
    it), e.g. ``"</think>"`` so that a reasoning model thinks freely and then answers in the
    format; before it any text but the end-of-sequence and other special tokens may come, except the strings
    in ``after_excludes`` (e.g. ``"<tool_call>"``, which the chat parser would take for the end of the
    reasoning).  ``strict`` (JSON kinds): a schema keyword the compiler cannot enforce is an error rather than
    ignored.

    Generation ends with ``finish_reason "stop"`` as soon as the grammar is complete; ``max_tokens`` still
    applies (an output cut off by it is incomplete).  Frozen and hashable: compiled grammars are cached by
    spec.  Schemas are kept as compact JSON text (their key order kept: an object's properties are written in
    the order its schema lists them).
    """

    kind: str
    value: Any = ""
    after: str | None = None
    strict: bool = False
    after_excludes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured.kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        value = self.value
        if self.kind == "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"structured.value must be a JSON schema, got text that is not JSON ({e})") \
                        from None
            if not isinstance(value, (Mapping, bool)):
                raise ValueError(f"structured.value must be a JSON schema (an object), got {type(value).__name__}")
            try:  # JSON text: the cache key, and a check that it is plain JSON data.  Key order is kept: the order
                # of "properties" is the order the output writes them in.
                value = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"structured.value must hold only JSON data ({e})") from None
        elif self.kind == "json_object":
            value = ""
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"structured.value must be a non-empty {self.kind} string, got {value!r}")
        object.__setattr__(self, "value", value)
        if self.after is not None and (not isinstance(self.after, str) or not self.after):
            raise ValueError(f"structured.after must be a non-empty string or None, got {self.after!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"structured.strict must be a bool, got {self.strict!r}")
        excludes = self.after_excludes
        if isinstance(excludes, str) or not isinstance(excludes, Iterable) or \
                not all(isinstance(x, str) and x for x in excludes):
            raise ValueError(f"structured.after_excludes must be a list of non-empty strings, got {excludes!r}")
        object.__setattr__(self, "after_excludes", tuple(excludes))
        if self.after_excludes and self.after is None:
            raise ValueError("structured.after_excludes needs structured.after")

    @classmethod
    def json(cls, schema: Mapping[str, Any] | str, **kw: Any) -> StructuredSpec:
        return cls("json_schema", schema, **kw)

    @classmethod
    def json_object(cls, **kw: Any) -> StructuredSpec:
        return cls("json_object", **kw)

    @classmethod
    def lark(cls, grammar: str, **kw: Any) -> StructuredSpec:
        return cls("lark", grammar, **kw)

    @classmethod
    def regex(cls, pattern: str, **kw: Any) -> StructuredSpec:
        return cls("regex", pattern, **kw)

    @property
    def schema(self) -> Any:
        """The JSON schema as data (json_schema kind), else None."""
        return json.loads(self.value) if self.kind == "json_schema" else None


def _normalise_structured(value: Any) -> StructuredSpec | None:
    """None, a StructuredSpec, or its fields as a mapping (what the chat layer, which cannot import the engine,
    hands over)."""
    if value is None or isinstance(value, StructuredSpec):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"kind", "value", "after", "strict", "after_excludes"})
        if unknown:
            raise ValueError(f"structured has unknown field(s) {', '.join(map(repr, unknown))}")
        if "kind" not in value:
            raise ValueError("structured needs a 'kind'")
        return StructuredSpec(**value)
    raise ValueError(f"structured must be a StructuredSpec, a mapping of its fields, or None, got "
                     f"{type(value).__name__}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Frozen so that one instance can be shared by the ``n`` sequences of a request and by the
    engine's bookkeeping without anyone changing it under the others; use
    ``dataclasses.replace`` to derive a variant (it validates again).

    ``structured``: a :class:`StructuredSpec` (or a mapping of its fields) the output must follow, enforced by
    masking the logits with a grammar (needs ``pip install 'qwen35[structured]'``), e.g.
    ``SamplingParams(max_tokens=200, structured=StructuredSpec.json({"type": "object", ...}))`` with
    ``LLM.generate``; each of the ``n`` samples and each request of a batch follows it separately.  The mask
    applies before penalties and sampling (greedy too); logprobs stay the model's raw ones.
    """

    n: int = 1
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # N: return the chosen token's logprob and the top N
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        self._check_int("n", minimum=1)
        if self.max_tokens is not None:
            self._check_int("max_tokens", minimum=1, none_allowed=True)
        self._check_int("min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

        self._check_float("temperature", ">= 0", lambda v: v >= 0)
        self._check_int("top_k", minimum=-1)
        self._check_float("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_float("min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        self._check_float("repetition_penalty", "> 0", lambda v: v > 0)
        self._check_float("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        self._check_float("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)

        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.logprobs is not None:
            self._check_int("logprobs", minimum=0, maximum=MAX_LOGPROBS, none_allowed=True)

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "structured", _normalise_structured(self.structured))

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0) rather than sampled."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def _check_int(
        self, name: str, minimum: int, maximum: int | None = None, none_allowed: bool = False
    ) -> None:
        value = getattr(self, name)
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        kind = "an int or None" if none_allowed else "an int"
        if not _is_int(value):
            raise ValueError(f"{name} must be {kind} {allowed}, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"{name} must be {allowed}, got {value}")

    def _check_float(self, name: str, allowed: str, ok: Any) -> None:
        value = getattr(self, name)
        if not _is_number(value):
            raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
        if not ok(value):
            raise ValueError(f"{name} must be {allowed}, got {value}")


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, Iterable) or isinstance(stop, (bytes, dict)):
        raise ValueError(f"stop must be a str or a list of non-empty str, got {stop!r}")
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a str or a list of non-empty str, got element {s!r}")
    return stop


def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
        raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")
    ids = tuple(ids)
    for i in ids:
        if not _is_int(i) or i < 0:
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got element {i!r}")
    return ids


def sampling_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments a checkpoint recommends in its generation_config.json: only the
    well-typed ones (a bad file must not break every request); ``do_sample: false`` means greedy.  The one set of
    defaults for LLM, the CLI and the server."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = generation_config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    top_k = generation_config.get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        out["top_k"] = top_k
    if generation_config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
