"""One generation stream: its tokens, how far the cache has processed them, and why it stopped."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

from .params import SamplingParams

if TYPE_CHECKING:
    from .multimodal import PromptVision

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV / state the cache holds
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None  # time.monotonic() when the scheduler first ran it (queue time ends)
    num_preemptions: int = 0
    # speculative decoding: tokens proposed for this step (verified by the next forward, then cleared), and
    # this sequence's running account of how many proposed tokens were accepted
    draft_ids: list[int] = field(default_factory=list)
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_off: bool = False  # drafting stopped for this sequence: it did not pay
    # prefix caching: prompt tokens served from the cache (at its first admission); chain hashes of its full blocks
    # (blocks.extend_hashes); prompt positions worth a snapshot besides the block grid (where chat messages start,
    # set by the engine); the positions still to snapshot at, ascending (set at admission)
    num_cached_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    snapshot_marks: list[int] = field(default_factory=list)
    snapshot_points: list[int] = field(default_factory=list)
    # images and videos of the prompt: their pad positions, M-RoPE positions, embeddings (engine.multimodal)
    vision: PromptVision | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cache_ids(self) -> list[int]:
        """What the prefix cache hashes: the tokens, with every image / video pad standing for its picture's
        content, so that prompts differing only in their pictures share nothing."""
        if self.vision is None:
            return self.all_ids
        return self.vision.cache_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.length - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
