"""The engine loop: requests in, one scheduled forward per step, tokens and text deltas out.

``LLMEngine`` is synchronous and single-threaded (``step()`` does one forward); ``LLM`` (llm.py) and the async
engine drive it.  It owns the model, the cache, the scheduler and the sampler, and turns sampled tokens into
text with an incremental detokenizer per sequence, so stop strings are found even when split across tokens.

Structured output: a request whose SamplingParams carry a ``structured`` spec gets a grammar matcher per sequence
(engine/structured.py); each step the batch's constrained rows are masked to what their grammar allows, the
sampled token advances the matcher, and a sequence whose grammar is complete ends with finish_reason "stop".
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from .cache import HybridCache
from .kv_quant import check_kv_cache_dtype, memory_name
from .multimodal import VisionInput, prompt_vision
from .params import SamplingParams
from .runner import ModelRunner
from .sampler import Sampler
from .sampler import _logprobs as raw_logprobs  # the sampler's own definition of a logprob
from .scheduler import Scheduler, message_marks
from .sequence import Sequence
from .speculative import Drafter, SpeculativeConfig, make_drafter
from .stop import StopStringMatcher
from .structured import GrammarMatcher, StructuredCompiler

GiB = 1024 ** 3


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoding at once (one DeltaNet state slot each)
    max_num_batched_tokens: int = 512  # tokens per forward: decodes + prompt chunks
    block_size: int = 16  # tokens per KV block
    cache_memory: int | None = None  # bytes for KV blocks + state slots; None = enough for max_num_seqs × 4096
    max_model_len: int | None = None  # cap on prompt + output; None = the model's context
    speculative_config: SpeculativeConfig | None = None  # draft tokens and verify them (see speculative.py)
    # resume requests from cached prefixes (KV blocks + DeltaNet state snapshots; see cache.py and blocks.py)
    enable_prefix_caching: bool = True
    # how keys and values are stored: "auto" (the model dtype), "int8" or "fp8" (one byte per value plus a float32
    # scale per token per KV head: half the attention layers' cache memory; see kv_quant.py)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.cache_memory is not None and (not isinstance(self.cache_memory, int) or self.cache_memory < 1):
            raise ValueError(f"cache_memory must be a positive number of bytes, got {self.cache_memory!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    delta_text: str = ""  # new since the previous RequestOutput of this request
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    scheduled_at: float | None = None  # time.monotonic() when the engine first ran the request (None: not yet)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (vLLM's name; 0 until scheduled)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    outputs: list[CompletionOutput]
    decoders: list
    matchers: list[StopStringMatcher | None]
    emitted: list[int]  # tokens already reported per sequence
    grammars: list[GrammarMatcher | None] = field(default_factory=list)  # structured output, per sequence


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        cfg = model.config
        ctx = cfg.text.max_context
        c = self.config
        self.max_model_len = min(c.max_model_len or ctx, ctx)
        memory = c.cache_memory
        if memory is None:
            from ..memory import kv_bytes_per_token, state_bytes_per_sequence
            name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[model.dtype]
            kv_name = memory_name(c.kv_cache_dtype, model.dtype)
            memory = c.max_num_seqs * (state_bytes_per_sequence(cfg, name).total
                                       + min(self.max_model_len, 4096) * kv_bytes_per_token(cfg, kv_name))
            memory = min(memory, 8 * GiB)
        self.cache = HybridCache.from_budget(cfg, memory, c.max_num_seqs, c.block_size, model.dtype, str(model.device),
                                             prefix_caching=c.enable_prefix_caching,
                                             kv_cache_dtype=c.kv_cache_dtype)
        # a sequence can never outgrow the cache: lengths are capped at its capacity
        self.max_model_len = min(self.max_model_len, self.cache.layout.max_tokens)
        self.scheduler = Scheduler(self.cache, c.max_num_seqs, c.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._seq_owner: dict[int, _Request] = {}
        self._counter = itertools.count()
        self.vocab_limit = len(tokenizer) if tokenizer is not None else None
        self.eos_ids: frozenset[int] = frozenset(tokenizer.stop_token_ids) if tokenizer is not None else frozenset(
            _config_eos(cfg))
        self.drafter: Drafter | None = None
        if c.speculative_config is not None:
            self.drafter = make_drafter(c.speculative_config, model, self.cache)
        self._structured: StructuredCompiler | None = None  # built on the first structured request
        self._structured_lock = threading.Lock()
        # where a chat message starts: the prefix cache keeps the state there (see scheduler.message_marks)
        to_id = getattr(tokenizer, "token_to_id", None)
        self._message_start: int | None = to_id("<|im_start|>") if to_id is not None else None

    # -- structured output --------------------------------------------------------------------------------
    @property
    def structured(self) -> StructuredCompiler:
        """The grammar compiler over this engine's tokenizer (``ValueError`` without llguidance or a tokenizer)."""
        with self._structured_lock:  # the server compiles on worker threads while the engine thread runs
            if self._structured is None:
                self._structured = StructuredCompiler(self.tokenizer, self.eos_ids)
        return self._structured

    def check_structured(self, params: SamplingParams) -> None:
        """Compile ``params.structured`` now (it is cached for the request), so that a caller can refuse a bad
        grammar before it starts answering; ``ValueError`` naming the problem."""
        if params.structured is not None:
            self.structured.compile(params.structured)

    # -- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, vision: VisionInput | None = None) -> str:
        """Queue a request; returns its id.  ``vision``: the prompt's images and videos, preprocessed, with the
        prompt's pad tokens already expanded to one per picture token (see engine.multimodal)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else f"req-{next(self._counter)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load a model with one")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("prompt token ids must be integers")
            vocab = self.model.config.text.vocab_size
            bad = [i for i in ids if i < 0 or i >= vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                             f"(prompt + at least one generated token); shorten it or raise max_model_len / "
                             "cache_memory")
        pictures = None
        if vision is not None and not vision.empty:
            pictures = prompt_vision(self.model, ids, vision)
        grammars: list[GrammarMatcher | None] = [None] * params.n
        if params.structured is not None:
            grammars = [self.structured.matcher(params.structured) for _ in range(params.n)]
        seqs, decoders, matchers = [], [], []
        marks = message_marks(ids, self._message_start) if self.cache.prefix_caching else []
        for i in range(params.n):
            seq = Sequence(request_id, ids, params, index=i, snapshot_marks=marks, vision=pictures)
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.seed + i)
            seqs.append(seq)
            decoders.append(self.tokenizer.incremental_decoder(params.skip_special_tokens)
                            if self.tokenizer is not None else None)
            matchers.append(StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None)
        outputs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                    top_logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        req = _Request(request_id, text, ids, params, seqs, outputs, decoders, matchers, [0] * params.n, grammars)
        for seq in seqs:
            self.scheduler.add(seq)
            self._seq_owner[seq.seq_id] = req
        self.requests[request_id] = req
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its cache. False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq, out in zip(req.seqs, req.outputs):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                out.finish_reason = "abort"
            self._seq_owner.pop(seq.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.drafter is not None:
            self.drafter.propose([s for s in self.scheduler.running if s.remaining == 1], self.max_model_len)
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        try:
            seqs, logits, counts = self.runner.run(batch)
            touched: dict[str, _Request] = {}
            starts = list(itertools.accumulate([0] + counts[:-1]))
            plain = [i for i, n in enumerate(counts) if n == 1]
            if plain:
                group = [seqs[i] for i in plain]
                # every row a plain decode (the usual step): the logits as they are, not a gathered copy
                picked = logits if len(plain) == logits.shape[0] else \
                    logits[torch.tensor([starts[i] for i in plain], dtype=torch.long)]
                result = self.sampler(picked, [s.params for s in group], [s.output_ids for s in group],
                                      [s.generator for s in group], vocab_limit=self.vocab_limit,
                                      min_tokens_mask_ids=[self._blocked(s) for s in group],
                                      allowed_token_mask=self._grammar_mask(group))
                for i, seq in enumerate(group):
                    self._append(seq, result.token_ids[i], result.logprobs[i], result.top_logprobs[i], touched)
            for i, n in enumerate(counts):
                if n > 1:
                    self._verify(seqs[i], logits[starts[i]:starts[i] + n], touched)
        finally:
            self.cache.end_step()
            for seq in batch.decodes:
                seq.draft_ids = []
        if self.drafter is not None:  # drafts for the next step from this one's hidden states (MTP)
            self.drafter.after_step(self.runner.last_segments, self.runner.last_hidden, self.max_model_len,
                                    self.vocab_limit)
        return [self._report(req) for req in touched.values()]

    def _append(self, seq: Sequence, tok: int, logprob, top, touched: dict[str, _Request]) -> None:
        seq.output_ids.append(tok)
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top)
        req = self._seq_owner[seq.seq_id]
        self._after_token(req, seq, tok)
        touched[req.request_id] = req

    def _verify(self, seq: Sequence, logits: torch.Tensor, touched: dict[str, _Request]) -> None:
        """Keep the longest run of draft tokens the model agrees with, plus one token of its own; rewind the
        rest.  ``logits`` [1 + drafts, V]: row j predicts the token after the j-th token of the segment."""
        drafts = list(seq.draft_ids)
        start = seq.num_computed - len(drafts) - 1  # the runner counted the drafts in; undo that first
        seq.num_computed = start + 1
        accepted = 0
        for j in range(len(drafts) + 1):
            draft = drafts[j] if j < len(drafts) else None
            tok, logprob, top = self._sample_verified(seq, logits[j:j + 1], draft)
            self._append(seq, tok, logprob, top, touched)
            if seq.finished or tok != draft:
                break
            accepted += 1
            seq.num_computed += 1  # the accepted draft's KV and state are in the cache
        if not seq.finished and accepted < len(drafts):
            self.cache.rewind(seq.seq_id, accepted)
        self.drafter.account(seq, len(drafts), accepted)

    def _sample_verified(self, seq: Sequence, logits: torch.Tensor, draft: int | None):
        """One token from one verifying row: plain sampling (greedy rows, the last row), or the rejection rule
        for a draft token under a sampled row (see speculative.py)."""
        args = dict(vocab_limit=self.vocab_limit, min_tokens_mask_ids=[self._blocked(seq)],
                    allowed_token_mask=self._grammar_mask([seq]))
        if draft is None or seq.params.greedy:
            r = self.sampler(logits, [seq.params], [seq.output_ids], [seq.generator], **args)
            return r.token_ids[0], r.logprobs[0], r.top_logprobs[0]
        p = self.sampler.distribution(logits, [seq.params], [seq.output_ids], **args)[0]
        g = seq.generator
        u = float(torch.rand(1, generator=g)) if g is not None else float(torch.rand(1))
        if draft < p.shape[0] and u < float(p[draft]):
            tok = draft
        else:
            rest = p.clone()
            if draft < rest.shape[0]:
                rest[draft] = 0.0
            tok = int(torch.multinomial(rest / rest.sum(), 1, generator=g)) if float(rest.sum()) > 0 else draft
        logprobs, top = raw_logprobs(logits[:, :p.shape[0]], [seq.params], [tok])
        return tok, logprobs[0], top[0]

    def _grammar_of(self, seq: Sequence) -> GrammarMatcher | None:
        req = self._seq_owner.get(seq.seq_id)
        if req is None or not req.grammars:
            return None
        return req.grammars[seq.index]

    def _grammar_mask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """What the grammars of the constrained sequences allow next (None when none is constrained)."""
        grammars = [self._grammar_of(s) for s in seqs]
        if all(g is None for g in grammars):
            return None
        for g, s in zip(grammars, seqs):
            if g is not None:
                # The matcher follows output_ids, which preemption keeps: in sync, unless something replaced the
                # tokens behind its back, and then it is rebuilt from them.
                g.sync(s.output_ids)
        return self.structured.allowed_mask(grammars)

    def _blocked(self, seq: Sequence) -> set[int] | None:
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            return None
        return set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))

    def _after_token(self, req: _Request, seq: Sequence, tok: int) -> None:
        p = seq.params
        i = seq.index
        out = req.outputs[i]
        done_min = len(seq.output_ids) >= p.min_tokens
        reason: str | None = None
        stop_reason: int | str | None = None
        grammar = req.grammars[i] if req.grammars else None
        grammar_done = False
        if grammar is not None:
            if not grammar.advance(tok):
                # Cannot happen with the mask applied; if it does, the output no longer follows the grammar and
                # the sequence is ended rather than continued unconstrained.
                reason, stop_reason = "abort", f"grammar error: {grammar.error}"
            grammar_done = grammar.done
        if reason is not None:
            pass
        elif done_min and not p.ignore_eos and tok in self.eos_ids:
            reason, stop_reason = "stop", tok
        elif done_min and tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        # text: eos / stop tokens are not part of the text
        dec, matcher = req.decoders[i], req.matchers[i]
        if dec is not None and reason is None:
            delta = dec.step(tok)
            if matcher is not None and done_min:  # stop strings count only once min_tokens are out
                delta, hit = matcher.feed(delta)
                if hit:
                    reason, stop_reason = "stop", matcher.matched_stop
            out.text += delta
            out.delta_text += delta
        flush = False  # the last token is text: flush the decoder and the stop-string matcher
        if reason is None and grammar_done:
            reason, flush = "stop", True  # the grammar is complete: nothing else may follow
        if reason is None:
            limit = p.max_tokens if p.max_tokens is not None else self.max_model_len
            if len(seq.output_ids) >= limit or seq.length >= self.max_model_len:
                reason, flush = "length", True
        if reason is not None:
            if dec is not None and flush:
                tail = dec.finish()
                if matcher is not None and not matcher.stopped:
                    tail, _ = matcher.feed(tail)
                    tail += matcher.flush()
                out.text += tail
                out.delta_text += tail
            out.finish_reason, out.stop_reason = reason, stop_reason
            self.scheduler.finish(seq, reason)

    def _report(self, req: _Request) -> RequestOutput:
        for seq, out in zip(req.seqs, req.outputs):
            new = seq.output_ids[req.emitted[seq.index]:]
            out.delta_token_ids = list(new)
            out.token_ids = list(seq.output_ids)
            if out.logprobs is not None:
                out.logprobs = list(seq.logprobs)
                out.top_logprobs = list(seq.top_logprobs)
            req.emitted[seq.index] = len(seq.output_ids)
        finished = all(o.finished for o in req.outputs)
        started = [s.first_scheduled for s in req.seqs if s.first_scheduled is not None]
        snapshot = RequestOutput(req.request_id, req.prompt, req.prompt_ids,
                                 [_copy_output(o) for o in req.outputs], finished, min(started, default=None),
                                 num_cached_tokens=req.seqs[0].num_cached_tokens)
        for o in req.outputs:
            o.delta_text = ""
        if finished:
            self.requests.pop(req.request_id, None)
            for seq in req.seqs:
                self._seq_owner.pop(seq.seq_id, None)
        return snapshot


def _copy_output(o: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason, o.stop_reason,
                            None if o.logprobs is None else list(o.logprobs),
                            None if o.top_logprobs is None else list(o.top_logprobs), o.delta_text,
                            list(o.delta_token_ids))


def _config_eos(cfg) -> list[int]:
    eos = cfg.text.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, tuple) else [eos]
