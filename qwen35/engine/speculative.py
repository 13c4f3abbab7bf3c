"""Speculative decoding: propose a few tokens cheaply, verify them in one forward of the model, keep what it agrees with.

The interface is vLLM's: ``speculative_config={"method": "ngram", "num_speculative_tokens": k, ...}``.

Verification (``LLMEngine.step``) keeps the output distribution the target model's exactly:

* greedy rows accept a draft token while it is the argmax of the verifying logits (so the text is token-identical
  to plain greedy decoding), and the first disagreement is replaced by that argmax;
* sampled rows use the rejection rule for a deterministic draft: draft token ``d`` is accepted with probability
  ``p(d)`` under the sampling distribution ``p`` (temperature, top-k/p, penalties, grammar applied); on rejection
  the token is drawn from ``p`` with ``d`` removed and renormalised.  Either way one extra token comes from the
  last verifying row, so a step yields 1 to k + 1 tokens.

Every verified token is computed with the arithmetic of a plain decode step (see ``runner.PagedContext``), and a
rejected draft's DeltaNet state is rewound from the per-token snapshots the cache keeps during the step.

Drafting turns itself off where it does not pay: for a sequence whose acceptance falls below
``min_acceptance`` after ``warmup`` proposals, and for a step with more decoding sequences than
``max_batch_size`` (on a CPU a wide batch is compute-bound, so verifying extra tokens costs what it saves).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger("qwen35.engine")

METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 2
    # n-gram (prompt lookup) drafting: the longest suffix of the text of 1..max tokens that occurred before
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # when to stop drafting
    max_batch_size: int = 8
    min_acceptance: float = 0.2  # accepted / proposed tokens of one sequence
    warmup: int = 16  # proposed tokens before a sequence's acceptance is judged

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}"
                             + (" (MTP drafting is not available yet)" if self.method == "mtp" else ""))
        for name, low, high in (("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS),
                                ("prompt_lookup_max", 1, 64), ("prompt_lookup_min", 1, 64),
                                ("max_batch_size", 1, 1 << 20), ("warmup", 0, 1 << 20)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"speculative_config.{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max")
        if not isinstance(self.min_acceptance, (int, float)) or not 0 <= self.min_acceptance <= 1:
            raise ValueError(f"speculative_config.min_acceptance must be in [0, 1], got {self.min_acceptance!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config from a dict or its JSON text (the CLI's --speculative-config); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise ValueError("speculative_config must be an object such as "
                             '{"method": "ngram", "num_speculative_tokens": 2}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**dict(value))


def ngram_draft(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Prompt lookup: for n from ``max_n`` down to ``min_n``, find the latest earlier occurrence of the last n
    tokens and propose the (up to) k tokens that followed it.  [] when nothing matches."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n:])
        # search right to left: recent context is the likeliest to repeat
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == suffix[0] and list(tokens[start:start + n]) == suffix:
                follow = list(tokens[start + n:start + n + k])
                if follow:
                    return follow
                break
    return []


@dataclass
class SpeculativeStats:
    """Counters for /metrics and the log."""

    steps: int = 0  # steps that verified drafts
    proposed: int = 0
    accepted: int = 0
    disabled_sequences: int = 0  # sequences whose drafting was turned off for low acceptance
    skipped_wide_batches: int = 0  # steps with more decodes than max_batch_size, not drafted

    def as_dict(self) -> dict[str, int]:
        return {"spec_steps": self.steps, "spec_proposed_tokens": self.proposed,
                "spec_accepted_tokens": self.accepted, "spec_disabled_sequences": self.disabled_sequences,
                "spec_skipped_batches": self.skipped_wide_batches}


class Drafter:
    """Proposes draft tokens for the sequences about to decode, and keeps the acceptance account."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.stats = SpeculativeStats()

    def propose(self, seqs: Sequence[Any], max_model_len: int) -> None:
        """Set ``draft_ids`` of each decoding sequence (prompt + output so far is its context)."""
        c = self.config
        if len(seqs) > c.max_batch_size:
            self.stats.skipped_wide_batches += 1
            return
        for seq in seqs:
            if seq.spec_off:
                continue
            p = seq.params
            limit = p.max_tokens if p.max_tokens is not None else max_model_len
            # never draft past the token limit or the context: those tokens could not be kept
            room = min(c.num_speculative_tokens, limit - len(seq.output_ids) - 1, max_model_len - seq.length - 1)
            if room <= 0:
                continue
            seq.draft_ids = ngram_draft(seq.all_ids, room, c.prompt_lookup_max, c.prompt_lookup_min)

    def account(self, seq: Any, proposed: int, accepted: int) -> None:
        self.stats.steps += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        c = self.config
        if not seq.spec_off and seq.spec_proposed >= c.warmup and seq.spec_accepted < c.min_acceptance * seq.spec_proposed:
            seq.spec_off = True
            self.stats.disabled_sequences += 1
            logger.info("speculative decoding off for %s#%d: %d of %d draft tokens accepted", seq.request_id,
                        seq.index, seq.spec_accepted, seq.spec_proposed)
