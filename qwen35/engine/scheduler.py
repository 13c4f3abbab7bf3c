"""Which sequences run in the next step.

Continuous batching under a per-step token budget: every running sequence that is decoding gets its one
token; the budget left goes to prompt chunks (partly prefilled sequences first, then new arrivals), so a long
prompt is spread over several steps and never stalls the decodes.  When the KV pool runs dry the most
recently arrived running sequence is preempted: its blocks and slot are freed and it is recomputed later
from its tokens (prompt + what it generated so far).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .cache import HybridCache
from .sequence import Sequence, Status


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

    # -- membership ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.cache.check_fits(len(seq.prompt_ids) + 1)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence and free its cache at once."""
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.cache.release(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

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
        # 1. decodes (one token left before the next sample, plus any draft tokens to verify), oldest first
        for seq in sorted(self.running, key=_age):
            if budget <= 0:
                break
            if seq not in self.running or seq.remaining != 1:
                continue
            del seq.draft_ids[max(0, budget - 1):]  # drafts only as far as the budget goes
            tokens = 1 + len(seq.draft_ids)
            if not self._reserve(seq, seq.num_computed + tokens, batch) and seq.draft_ids:
                seq.draft_ids.clear()  # no room for the drafts: decode plainly
                tokens = 1
                if seq not in self.running:
                    continue
            if seq in self.running and self._reserve(seq, seq.num_computed + tokens, batch):
                batch.decodes.append(seq)
                budget -= tokens
            elif seq in self.running:
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
        # 3. admit waiting sequences (preempted ones first) while budget, slots and blocks last
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.remaining, budget)
            if not self.cache.can_admit(n):
                break
            self.waiting.popleft()
            self.cache.admit(seq.seq_id)
            self.cache.grow(seq.seq_id, n)
            seq.status = Status.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        return batch


def _age(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival, seq.seq_id)
