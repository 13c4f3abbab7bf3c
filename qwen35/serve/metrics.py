"""Prometheus metrics of one server, in a registry of its own.

Counters are updated as requests pass; the engine's state (requests running and waiting, KV blocks and DeltaNet
state slots in use) is read from :meth:`AsyncLLM.stats` at scrape time, so what /metrics shows is the engine's
state at that moment, not a sample taken earlier.  An own registry (rather than prometheus_client's global one)
lets several servers live in one process, as the tests do, without colliding metric names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
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


class _EngineCollector(Collector):
    def __init__(self, async_llm: Any) -> None:
        self._llm = async_llm

    def collect(self) -> Iterator[Metric]:
        stats = self._llm.stats()
        for name, key, doc in _ENGINE_GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(stats.get(key, 0)))
            yield gauge
        errors = CounterMetricFamily("qwen35_engine_step_errors", "Engine steps that failed (their requests were "
                                     "ended with an error; the server kept running).")
        errors.add_metric([], float(getattr(self._llm, "errors", 0)))
        yield errors


class ServerMetrics:
    def __init__(self, async_llm: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qwen35_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("qwen35_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("qwen35_generation_tokens", "Generated tokens (all choices, aborted "
                                         "requests included).", registry=self.registry)
        self.aborted = Counter("qwen35_requests_aborted", "Requests aborted because the client went away.",
                               registry=self.registry)
        self.registry.register(_EngineCollector(async_llm))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
