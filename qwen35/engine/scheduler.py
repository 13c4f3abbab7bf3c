"""Which sequences run in the next step.

Continuous batching under a per-step token budget: every running sequence that is decoding gets its one
token; the budget left goes to prompt chunks (partly prefilled sequences first, then new arrivals), so a long
prompt is spread over several steps and never stalls the decodes.  When the KV pool runs dry the most
recently arrived running sequence is preempted: its blocks and slot are freed and it is recomputed later
from its tokens (prompt + what it generated so far).

Prefix caching (when the cache has it on): a sequence being admitted -- new, or preempted and recomputed -- starts
after the longest prefix of its tokens the cache holds a snapshot of (``num_computed`` = that length, the runner
continues from the restored state as from any earlier chunk).  Snapshots are taken where a later request is likely
to continue: at the end of every prompt, at the end of every finished generation, where chat messages start
(``Sequence.snapshot_marks``) and on a grid inside long prompts.  A prompt chunk is not cut at such a point: the
runner splits only the DeltaNet mix there and the cache keeps the state it passed, of which a snapshot is made after
the step.  The scheduler only decides; the bookkeeping is ``blocks.BlockManager`` (plain Python) and the copies are
the cache's.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sequence import Sequence, Status

if TYPE_CHECKING:
    from .cache import HybridCache


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(1 + len(s.draft_ids) for s in self.decodes) + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(self, cache: HybridCache, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # decode sequences verifying draft tokens this step -> their num_computed before it (finish() needs it)
        self._verify_from: dict[int, int] = {}

    # -- membership ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.cache.check_fits(len(seq.prompt_ids) + 1)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence and free its cache at once."""
        if seq.finished:
            return
        if reason != "abort":
            self._snapshot_passed(seq)
            self._snapshot_at_finish(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.cache.release(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _snapshot_at_finish(self, seq: Sequence) -> None:
        """Keep the state of a finished generation (all its tokens but the last, which never ran): what the next
        turn of a conversation, or a prompt continuing this text, resumes from.

        Not for aborts: an abort may follow a failed step, whose state is not to be trusted.  A sequence that ends
        while verifying draft tokens has its slot past the accepted ones; the state after the last accepted token
        is the one the cache kept during the step (token ``step`` of it)."""
        if not self.cache.prefix_caching or not self.cache.has_slot(seq.seq_id) or seq.num_computed <= 0:
            return
        step = None
        start = self._verify_from.get(seq.seq_id)
        if seq.draft_ids and start is not None:
            step = seq.num_computed - start - 1
        self.cache.snapshot(seq, seq.num_computed, step)

    def _snapshot_due(self) -> None:
        """Snapshots at the points the last step's chunks passed (states the cache kept on the way) or ended at
        (the slot holds exactly that state now)."""
        for seq in self.running:
            self._snapshot_passed(seq)
        self.cache.drop_kept_states()

    def _snapshot_passed(self, seq: Sequence) -> None:
        points = seq.snapshot_points
        while points and points[0] <= seq.num_computed:
            p = points.pop(0)
            if p == seq.num_computed or self.cache.has_kept_state(seq.seq_id, p):
                self.cache.snapshot(seq, p)

    def _points(self, seq: Sequence, past: int) -> list[int]:
        """Where to snapshot a sequence admitted with ``past`` tokens cached: message starts, the grid and the
        prompt end, past ``past`` and not cached already."""
        end = len(seq.prompt_ids)
        points = {m for m in seq.snapshot_marks if past < m < end}
        step = self.cache.snapshot_interval
        if step > 0:
            points.update(range((past // step + 1) * step, end, step))
        if past < end:
            points.add(end)
        return sorted(p for p in points if not self.cache.has_snapshot(seq, p))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.cache.release(seq.seq_id)
        seq.draft_ids.clear()
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        batch.decodes = [s for s in batch.decodes if s is not seq]
        batch.prefills = [(s, n) for s, n in batch.prefills if s is not seq]

    def _reserve(self, seq: Sequence, tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for ``tokens`` positions of ``seq``, preempting newer sequences if the pool is short.

        Only newer sequences are preempted, so the oldest running sequence always makes progress (any one
        sequence fits the cache alone: the engine caps lengths at its capacity)."""
        while not self.cache.grow(seq.seq_id, tokens):
            newer = [s for s in self.running if _age(s) > _age(seq)]
            if not newer:
                return False
            self._preempt(max(newer, key=_age), batch)
        return True

    # -- the step -----------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.budget
        self._verify_from.clear()
        if self.cache.prefix_caching:
            self._snapshot_due()
        # 1. decodes (one token left before the next sample, plus any draft tokens to verify), oldest first
        for seq in sorted(self.running, key=_age):
            if budget <= 0:
                break
            if seq not in self.running or seq.remaining != 1:
                continue
            del seq.draft_ids[max(0, budget - 1):]  # drafts only as far as the budget goes
            # (_reserve preempts only newer sequences, never ``seq`` itself)
            if seq.draft_ids and not self._reserve(seq, seq.num_computed + 1 + len(seq.draft_ids), batch):
                seq.draft_ids.clear()  # no room for the drafts: decode plainly
            tokens = 1 + len(seq.draft_ids)
            if self._reserve(seq, seq.num_computed + tokens, batch):
                batch.decodes.append(seq)
                budget -= tokens
                if seq.draft_ids:
                    self._verify_from[seq.seq_id] = seq.num_computed
            else:
                self._preempt(seq, batch)
        # 2. further prompt chunks of sequences already running
        for seq in sorted(self.running, key=_age):
            if budget <= 0:
                break
            if seq in self.running and seq.remaining > 1 and seq not in batch.decodes:
                n = min(seq.remaining, budget)
                if self._reserve(seq, seq.num_computed + n, batch):
                    batch.prefills.append((seq, n))
                    budget -= n
        # 3. admit waiting sequences (preempted ones first) while budget, slots and blocks last; each starts after
        # the longest prefix of its tokens the cache has
        caching = self.cache.prefix_caching
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.cache.lookup(seq) if caching else None
            past = hit.length if hit is not None else 0
            seq.snapshot_points = self._points(seq, past) if caching else []
            n = min(seq.length - past, budget)
            if not self.cache.can_admit(past + n, hit):
                break
            self.waiting.popleft()
            self.cache.admit(seq.seq_id)
            if caching:
                self.cache.blocks.note_lookup(seq.length)
            if hit is not None:
                self.cache.resume(seq, hit)
            seq.num_computed = past
            if seq.first_scheduled is None:
                seq.num_cached_tokens = past
            if not self.cache.grow(seq.seq_id, past + n):
                raise RuntimeError("admission found no blocks it had checked for")  # can_admit is exact
            seq.status = Status.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        return batch


def _age(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival, seq.seq_id)


def message_marks(ids: list[int], message_start: int | None) -> list[int]:
    """Prompt positions where the prefix cache should keep a state besides its grid: before the second message
    (the end of a system prompt, shared by every conversation that has it) and before the last one.  The last is
    what the next turn of a chat resumes from: the template re-renders the assistant turn that follows it without
    the reasoning that was generated (and without the generation prompt's think tags), so the next prompt agrees
    with this one exactly up to there, and no further."""
    if message_start is None:
        return []
    starts = [i for i, t in enumerate(ids) if t == message_start and i > 0]
    return sorted({starts[0], starts[-1]}) if starts else []
