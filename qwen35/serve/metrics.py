"""Prometheus metrics of one server, in a registry of its own.

Counters are updated as requests pass; the engine's state (requests running and waiting, KV blocks and DeltaNet
state slots in use) is read from :meth:`AsyncLLM.stats` at scrape time, so what /metrics shows is the engine's
state at that moment, not a sample taken earlier.  An own registry (rather than prometheus_client's global one)
lets several servers live in one process, as the tests do, without colliding metric names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# (metric name, AsyncLLM.stats() key, help text)
_ENGINE_GAUGES = (
    ("qwen35_num_requests_running", "running",
     "Sequences being prefilled or decoded (a request with n choices counts n)."),
    ("qwen35_num_requests_waiting", "waiting", "Sequences waiting for a state slot or cache blocks."),
    ("qwen35_kv_cache_blocks_used", "blocks_used", "KV cache blocks in use (full-attention layers)."),
    ("qwen35_kv_cache_blocks_total", "blocks_total", "KV cache blocks in all."),
    ("qwen35_state_slots_used", "slots_used", "DeltaNet recurrent state slots in use (one per running sequence)."),
    ("qwen35_state_slots_total", "slots_total", "DeltaNet recurrent state slots in all."),
)

# Prefix caching, when it is on (AsyncLLM.stats() keys; see qwen35/engine/blocks.py).  Gauges: what the cache holds
# now; counters: since the start.  queries / hits are in tokens, as vLLM counts them (hit rate = hits / queries).
_PREFIX_GAUGES = (
    ("qwen35_kv_cache_blocks_cached", "blocks_cached",
     ("KV blocks held only by the prefix cache (cached prefixes and their DeltaNet snapshots); free for sequences "
      "that need them.")),
    ("qwen35_prefix_cache_snapshots", "prefix_cache_snapshots",
     "Cached prefixes: DeltaNet state snapshots, each with the KV blocks of its prefix."),
)
_PREFIX_COUNTERS = (
    ("prefix_cache_queries", "Tokens that admitted sequences looked up in the prefix cache (their prompts)."),
    ("prefix_cache_hits", "Of the looked-up tokens, those served from the prefix cache instead of computed."),
    ("prefix_cache_lookups", "Sequences admitted with a prefix cache lookup."),
    ("prefix_cache_hit_requests", "Sequences admitted that resumed from a cached prefix."),
    ("prefix_cache_snapshots_taken", "DeltaNet state snapshots taken."),
    ("prefix_cache_evictions", "Cached prefixes evicted (least recently used first) to make room."),
)


# Speculative decoding, when the engine drafts (AsyncLLM.stats() keys; see qwen35/engine/speculative.py).
_SPEC_COUNTERS = (
    ("spec_steps", "Sequence steps that verified draft tokens."),
    ("spec_proposed_tokens", "Draft tokens proposed."),
    ("spec_accepted_tokens", "Draft tokens the model accepted (each saves one decode step)."),
    ("spec_disabled_sequences", "Sequences whose drafting was turned off for low acceptance."),
    ("spec_skipped_batches", "Steps not drafted because more sequences decoded than max_batch_size."),
)


class _EngineCollector(Collector):
    def __init__(self, async_llm: Any) -> None:
        self._llm = async_llm

    def collect(self) -> Iterator[Metric]:
        stats = self._llm.stats()
        for name, key, doc in _ENGINE_GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(stats.get(key, 0)))
            yield gauge
        for name, key, doc in _PREFIX_GAUGES:
            if key in stats:
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(stats[key]))
                yield gauge
        for key, doc in _PREFIX_COUNTERS + _SPEC_COUNTERS:  # present when the engine caches / drafts
            if key in stats:
                counter = CounterMetricFamily(f"qwen35_{key}", doc)
                counter.add_metric([], float(stats[key]))
                yield counter
        errors = CounterMetricFamily("qwen35_engine_step_errors", "Engine steps that failed (their requests were "
                                     "ended with an error; the server kept running).")
        errors.add_metric([], float(getattr(self._llm, "errors", 0)))
        yield errors


# Latency buckets in seconds: a CPU serves a first token in ~0.05 s (short prompt, small model) to minutes (a long
# prompt on a 27B); inter-token latencies run from a few ms to seconds.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServerMetrics:
    def __init__(self, async_llm: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen35_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("qwen35_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("qwen35_generation_tokens", "Generated tokens (all choices, aborted "
                                         "requests included).", registry=self.registry)
        self.media = Counter("qwen35_media_inputs", "Images and videos in chat requests, by kind and outcome "
                             "(accepted, or refused with a 400: unreadable, too large, not allowed, or a model "
                             "without a vision tower).", ["kind", "outcome"], registry=self.registry)
        self.aborted = Counter("qwen35_requests_aborted", "Requests aborted because the client went away.",
                               registry=self.registry)
        self.queue_time = Histogram("qwen35_request_queue_time_seconds", "Time from a request's arrival until the "
                                    "engine first scheduled it (waiting for a state slot or cache blocks).",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram("qwen35_time_to_first_token_seconds", "Time from a request's arrival "
                                             "to its first generated token (queue + prompt).",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("qwen35_inter_token_latency_seconds", "Time between consecutive "
                                             "generated tokens of a request (per token).",
                                             buckets=_TOKEN_GAP_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram("qwen35_e2e_request_latency_seconds", "Time from a request's arrival to its "
                                     "last token.", buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_speed = Histogram("qwen35_request_prompt_tokens_per_second", "Prompt tokens per second of a "
                                      "request, from its first scheduling to its first token.",
                                      buckets=_SPEED_BUCKETS, registry=self.registry)
        self.decode_speed = Histogram("qwen35_request_decode_tokens_per_second", "Generated tokens per second of a "
                                      "request after its first token (all choices).",
                                      buckets=_SPEED_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(async_llm))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """The timings of one request, observed into the histograms when it ends and written as one access-log line.

    ``arrived`` is when the server had the prompt ready for the engine; the engine's outputs then give the first
    scheduling (``RequestOutput.scheduled_at``, the engine's monotonic clock) and the tokens' arrival."""

    def __init__(self, metrics: ServerMetrics, request_id: str, endpoint: str) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.endpoint = endpoint
        self.arrived = time.monotonic()
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.prompt_tokens = 0
        self.tokens = 0
        self.finish_reasons: list[str] = []

    def output(self, out: Any) -> None:
        """Account one engine RequestOutput."""
        now = time.monotonic()
        self.prompt_tokens = len(out.prompt_token_ids)
        if self.scheduled is None:
            self.scheduled = out.scheduled_at
        new = sum(len(o.delta_token_ids) for o in out.outputs)
        if new:
            if self.first_token is None:  # the first delivery has no gap before it
                self.first_token = now
                self.metrics.time_to_first_token.observe(now - self.arrived)
            else:
                self.metrics.inter_token_latency.observe((now - self.last_token) / new)  # type: ignore[operator]
            self.last_token = now
        self.tokens += new
        if out.finished:
            self.finish_reasons = [str(o.finish_reason) for o in out.outputs]

    def end(self, status: str) -> str:
        """Observe the request's latencies; returns its access-log line.  ``status``: "ok", "aborted", "error"."""
        end = time.monotonic()
        m = self.metrics
        queue = None
        if self.scheduled is not None:
            queue = max(0.0, self.scheduled - self.arrived)
            m.queue_time.observe(queue)
        m.e2e_latency.observe(end - self.arrived)
        prompt_s = decode_s = None
        if self.first_token is not None:
            start = self.scheduled if self.scheduled is not None else self.arrived
            prompt_s = max(self.first_token - start, 1e-9)
            m.prompt_speed.observe(self.prompt_tokens / prompt_s)
            if self.tokens > 1 and self.last_token is not None and self.last_token > self.first_token:
                decode_s = self.last_token - self.first_token
                m.decode_speed.observe((self.tokens - 1) / decode_s)

        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}s"

        ttft = None if self.first_token is None else self.first_token - self.arrived
        decode = "-" if decode_s is None else f"{(self.tokens - 1) / decode_s:.1f}tok/s"
        return (f"{self.endpoint} {self.request_id} {status} prompt_tokens={self.prompt_tokens} "
                f"completion_tokens={self.tokens} queue={seconds(queue)} ttft={seconds(ttft)} "
                f"e2e={seconds(end - self.arrived)} decode={decode} "
                f"finish={','.join(self.finish_reasons) or '-'}")
