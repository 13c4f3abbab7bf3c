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
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .runner import PagedContext, Segment, position_rows

logger = logging.getLogger("qwen35.engine")

METHODS = ("ngram", "mtp")
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
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}")
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


class NgramIndex:
    """:func:`ngram_draft` for one growing token list, without rescanning it: for each n in [min_n, max_n] the
    latest start of every n-gram that has a token after it, extended as tokens are appended (a sequence's tokens
    only ever grow; preemption keeps them).  A lookup costs O(max_n) instead of O(length)."""

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start (n is the tuple's length)
        self.indexed = 0  # grams ending before this position are in ``latest``

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        length = len(tokens)
        # a gram ending at position e is followed by a token once e <= length - 2: index those not yet in
        for end in range(self.indexed, length - 1):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 >= 0:
                    self.latest[tuple(tokens[end - n + 1:end + 1])] = end - n + 1
        self.indexed = max(self.indexed, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(tokens[length - n:]))
            if start is not None:
                return list(tokens[start + n:start + n + k])
        return []


@dataclass
class SpeculativeStats:
    """Counters for /metrics and the log."""

    steps: int = 0  # steps that verified drafts
    proposed: int = 0
    accepted: int = 0
    disabled_sequences: int = 0  # sequences whose drafting was turned off for low acceptance
    skipped_wide_batches: int = 0  # steps with more decodes than max_batch_size, not drafted
    # per draft position j: how often a j-th draft token was proposed, and accepted
    proposed_at: list[int] = field(default_factory=lambda: [0] * MAX_SPECULATIVE_TOKENS)
    accepted_at: list[int] = field(default_factory=lambda: [0] * MAX_SPECULATIVE_TOKENS)

    def acceptance_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_at, self.proposed_at) if p]

    def as_dict(self) -> dict[str, int]:
        return {"spec_steps": self.steps, "spec_proposed_tokens": self.proposed,
                "spec_accepted_tokens": self.accepted, "spec_disabled_sequences": self.disabled_sequences,
                "spec_skipped_batches": self.skipped_wide_batches}


class Drafter:
    """Proposes draft tokens for the sequences about to decode, and keeps the acceptance account.

    ``propose`` runs before a step is scheduled (prompt lookup); ``after_step`` after it (a drafter that reads the
    step's hidden states, MTP).  Either sets ``seq.draft_ids`` for the next forward."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.stats = SpeculativeStats()

    def propose(self, seqs: Sequence[Any], max_model_len: int) -> None:
        """Set ``draft_ids`` of each decoding sequence before the step (prompt + output so far is its context);
        a drafter that reads the step's hidden states proposes in ``after_step`` instead."""

    def after_step(self, segments: Sequence[Any], hidden: Any, max_model_len: int, vocab_limit: int | None) -> None:
        """Called after every step with the forward's segments and hidden states; prompt lookup needs neither."""

    @staticmethod
    def room(seq: Any, k: int, max_model_len: int) -> int:
        """How many draft tokens could be kept: never past the token limit or the context."""
        p = seq.params
        limit = p.max_tokens if p.max_tokens is not None else max_model_len
        return min(k, limit - len(seq.output_ids) - 1, max_model_len - seq.length - 1)

    def account(self, seq: Any, proposed: int, accepted: int) -> None:
        self.stats.steps += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        for j in range(proposed):
            self.stats.proposed_at[j] += 1
            self.stats.accepted_at[j] += j < accepted
        seq.spec_proposed += proposed
        seq.spec_accepted += accepted
        c = self.config
        if not seq.spec_off and seq.spec_proposed >= c.warmup and seq.spec_accepted < c.min_acceptance * seq.spec_proposed:
            seq.spec_off = True
            self.stats.disabled_sequences += 1
            logger.info("speculative decoding off for %s#%d: %d of %d draft tokens accepted", seq.request_id,
                        seq.index, seq.spec_accepted, seq.spec_proposed)


class NgramDrafter(Drafter):
    """Prompt lookup (see :func:`ngram_draft`), through an :class:`NgramIndex` per sequence."""

    def __init__(self, config: SpeculativeConfig) -> None:
        super().__init__(config)
        self._indexes: dict[int, NgramIndex] = {}

    def propose(self, seqs: Sequence[Any], max_model_len: int) -> None:
        c = self.config
        if len(seqs) > c.max_batch_size:
            self.stats.skipped_wide_batches += 1
            return
        if len(self._indexes) > 2 * len(seqs) + 16:  # forget sequences that are gone (finished, aborted)
            live = {seq.seq_id for seq in seqs}
            self._indexes = {i: x for i, x in self._indexes.items() if i in live}
        for seq in seqs:
            if seq.spec_off:
                continue
            room = self.room(seq, c.num_speculative_tokens, max_model_len)
            if room <= 0:
                continue
            index = self._indexes.get(seq.seq_id)
            if index is None:
                index = self._indexes[seq.seq_id] = NgramIndex(c.prompt_lookup_max, c.prompt_lookup_min)
            seq.draft_ids = index.draft(seq.all_ids, room)


class MTPDrafter(Drafter):
    """Drafts with the checkpoint's multi-token-prediction block (``model.mtp``).

    After each forward, the MTP layer runs over every position whose hidden state and following token are now
    known (prompt chunks, the decoded token, the accepted drafts), writing its own KV rows -- kept here, laid out
    like the cache's KV so a sequence's block table addresses them -- and its output at a sequence's last position
    gives draft token 1; drafts 2..k feed the MTP output back (vLLM's recursion).  Drafts are the MTP head's
    argmax: a deterministic proposal, which the engine's verification keeps or rejects (so a stale MTP row, e.g.
    after a step it skipped, costs acceptance, never correctness).
    """

    def __init__(self, config: SpeculativeConfig, model: Any, cache: Any) -> None:
        super().__init__(config)
        if getattr(model, "mtp", None) is None:
            raise ValueError("speculative_config method 'mtp' needs a checkpoint with an MTP block (mtp.* weights); "
                             "this one has none -- use {\"method\": \"ngram\"} instead")
        self.model, self.cache = model, cache
        # in the cache's format (quantized too with kv_cache_dtype int8 / fp8) and row layout: a sequence resuming
        # from the prefix cache gets these rows copied too
        self.kv = {i: cache.new_layer_kv() for i in model.mtp.kv_layers}
        cache.shadow_kv.extend(t for kv in self.kv.values() for t in kv.tensors())

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in self.kv.values())

    @torch.inference_mode()
    def after_step(self, segments, hidden, max_model_len, vocab_limit) -> None:
        if hidden is None:
            return
        decoding = [s for s in segments if not s.seq.finished and s.seq.remaining == 1]
        if len(decoding) > self.config.max_batch_size:
            self.stats.skipped_wide_batches += 1
            return
        # 1. the MTP layer over every position of this step with a known next token
        rows, next_ids, mtp_segments = [], [], []
        for seg in segments:
            seq = seg.seq
            if seq.finished:
                continue
            ids = seq.all_ids
            n = min(seg.length, seq.num_computed - seg.past, len(ids) - 1 - seg.past)
            if n <= 0:
                continue
            mtp_segments.append(Segment(seq, len(rows), n, seg.past))
            rows.extend(range(seg.start, seg.start + n))
            next_ids.extend(ids[seg.past + 1:seg.past + 1 + n])
        if not mtp_segments:
            return
        dev = hidden.device
        x = self._run(mtp_segments, torch.tensor(next_ids, device=dev), hidden[torch.tensor(rows, device=dev)],
                      step=0, from_mtp=False)
        # 2. drafts for the sequences that decode next and whose last token this step covered
        drafting = []
        for seg in mtp_segments:
            seq = seg.seq
            if seq.spec_off or seq.remaining != 1 or seg.past + seg.length != seq.length - 1:
                continue
            room = self.room(seq, self.config.num_speculative_tokens, max_model_len)
            if room > 0:
                drafting.append((seq, seg.start + seg.length - 1, room))
        if not drafting:
            return
        last = x[torch.tensor([r for _, r, _ in drafting], device=dev)]
        tokens = self._argmax(last, vocab_limit)
        for (seq, _, _), t in zip(drafting, tokens):
            seq.draft_ids = [t]
        for j in range(1, max(r for _, _, r in drafting)):
            live = [(i, seq) for i, (seq, _, room) in enumerate(drafting) if room > j
                    and self.cache.grow(seq.seq_id, seq.length - 1 + j)]  # rows for the provisional MTP KV
            if not live:
                break
            segs = [Segment(seq, k, 1, seq.length - 2 + j) for k, (_, seq) in enumerate(live)]
            idx = torch.tensor([i for i, _ in live], device=dev)
            ids = torch.tensor([seq.draft_ids[-1] for _, seq in live], device=dev)
            last = self._run(segs, ids, last[idx], step=j, from_mtp=True)
            for (_, seq), t in zip(live, self._argmax(last, vocab_limit)):
                seq.draft_ids.append(t)
            drafting = [drafting[i] for i, _ in live]

    def _run(self, segments, next_ids, hidden, step: int, from_mtp: bool):
        """The MTP layer on ``hidden`` (one row per position of ``segments``) under the RoPE of those positions
        (M-RoPE rows for sequences with pictures)."""
        m = self.model
        if any(s.seq.vision is not None for s in segments):
            pos = torch.cat([position_rows(s) for s in segments], dim=1)[:, None].to(hidden.device)
        else:
            pos = torch.tensor([[p for s in segments for p in range(s.past, s.past + s.length)]], dtype=torch.long,
                               device=hidden.device)
        ctx = _MTPContext(self.cache, segments, 0, m.rope(pos, m.dtype), self.kv)
        return m.mtp_hidden_states(next_ids[None], hidden[None], ctx, step=step, from_mtp=from_mtp)[0]

    def _argmax(self, x, vocab_limit: int | None) -> list[int]:
        logits = self.model.compute_mtp_logits(x).float()
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        return logits.argmax(dim=-1).tolist()


class _MTPContext(PagedContext):
    """The engine's paged context, with the MTP layer's KV rows held by the drafter."""

    def __init__(self, cache, segments, num_decodes, rope, kv) -> None:
        super().__init__(cache, segments, num_decodes, rope)
        self.mtp_kv = kv

    def kv_tensors(self, layer: int):
        return self.mtp_kv[layer]


def make_drafter(config: SpeculativeConfig, model: Any, cache: Any) -> Drafter:
    return MTPDrafter(config, model, cache) if config.method == "mtp" else NgramDrafter(config)
