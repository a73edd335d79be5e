"""Prometheus metrics through `prometheus_client`, one `CollectorRegistry` per server (so two servers in
one process, as in the tests, never share a series).

- The server's own counters (`pie_connections_total`, `pie_http_requests_total`, ...), updated live.
- The HTTP generation APIs, vLLM-style and per model: `pie:num_requests_running` / `waiting` gauges,
  `pie:time_to_first_token_seconds`, `pie:inter_token_latency_seconds`,
  `pie:e2e_request_latency_seconds` and `pie:request_queue_time_seconds` histograms,
  `pie:prompt_tokens_total` / `pie:generation_tokens_total` / `pie:request_success_total` counters
  (`RequestTimer` feeds them).
- The runtime's state, read at scrape time (`RuntimeCollector`): KV pages, engine tokens and batches,
  preemptions (`pie:num_preemptions_total`: suspensions), swapped pages, prefix-cache hit tokens and
  hit rate (tokens attached from the prefix trie / tokens a pass asked for), processes by status.

A request is *waiting* from launch until its first token and *running* from then until it ends.
Queue time is from arrival until the inferlet started (admission under
`max_concurrent_processes`, sandbox start-up).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pie.runtime.api import RuntimeAPI

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pie_connections_total": ("WebSocket connections accepted.", ()),
    "pie_requests_total": ("Client messages handled, by type.", ("type",)),
    "pie_protocol_errors_total": ("Refused frames and requests (malformed, oversized, unknown, bad arguments).", ()),
    "pie_auth_failures_total": ("Refused authentication attempts.", ()),
    "pie_processes_launched_total": ("Inferlet processes launched, by program.", ("program",)),
    "pie_process_events_total": ("Process events streamed to clients, by kind.", ("event",)),
    "pie_http_requests_total": ("HTTP API requests, by path and status.", ("path", "status")),
}

# Latency buckets (seconds) as vLLM's: short for per-token times, long for whole requests.
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = {name: Counter(name.removesuffix("_total"), help, labels, registry=self.registry)
                          for name, (help, labels) in COUNTERS.items()}
        self._connections = Gauge("pie_connections_active", "Open WebSocket connections.", registry=self.registry)
        r = self.registry
        self.running = Gauge("pie:num_requests_running", "HTTP generation requests past their first token.",
                             ["model"], registry=r)
        self.waiting = Gauge("pie:num_requests_waiting", "HTTP generation requests before their first token.",
                             ["model"], registry=r)
        self.ttft = Histogram("pie:time_to_first_token_seconds", "Arrival to the first generated token.",
                              ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.itl = Histogram("pie:inter_token_latency_seconds", "Time between streamed token steps.",
                             ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("pie:e2e_request_latency_seconds", "Arrival to the last token.", ["model"],
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("pie:request_queue_time_seconds", "Arrival until the inferlet started.",
                               ["model"], buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pie:prompt_tokens", "Prompt tokens of HTTP generation requests.",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("pie:generation_tokens", "Tokens generated for HTTP requests.",
                                         ["model"], registry=r)
        self.successes = Counter("pie:request_success", "Finished HTTP generation requests, by finish reason.",
                                 ["model", "finished_reason"], registry=r)
        self._runtime_collector = RuntimeCollector()
        r.register(self._runtime_collector)

    # -- the server's counters (the API the session and processes use) --
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        assert name in COUNTERS, f"unknown counter {name}"
        counter = self._counters[name]
        (counter.labels(**labels) if labels else counter).inc(amount)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def connections_active(self) -> int:
        return int(self.registry.get_sample_value("pie_connections_active") or 0)

    @connections_active.setter
    def connections_active(self, value: int) -> None:
        self._connections.set(value)

    def render(self, runtime: RuntimeAPI | None) -> str:
        self._runtime_collector.runtime = runtime
        return generate_latest(self.registry).decode()

    def timer(self, model: str, arrived: float) -> RequestTimer:
        return RequestTimer(self, model, arrived)


class RequestTimer:
    """One HTTP generation request's timeline, fed to the histograms as it happens."""

    def __init__(self, metrics: Metrics, model: str, arrived: float) -> None:
        self._m, self._model, self._arrived = metrics, model, arrived
        self._last: float | None = None
        self._done = False
        metrics.waiting.labels(model).inc()

    def started(self) -> None:
        self._m.queue.labels(self._model).observe(time.monotonic() - self._arrived)

    def token(self) -> None:
        now = time.monotonic()
        if self._last is None:
            self._m.ttft.labels(self._model).observe(now - self._arrived)
            self._m.waiting.labels(self._model).dec()
            self._m.running.labels(self._model).inc()
        else:
            self._m.itl.labels(self._model).observe(now - self._last)
        self._last = now

    def finish(self, prompt_tokens: int = 0, completion_tokens: int = 0,
               finish_reasons: tuple[str, ...] = ()) -> None:
        if self._done:
            return
        self._done = True
        (self._m.waiting if self._last is None else self._m.running).labels(self._model).dec()
        if not finish_reasons:
            return  # failed or abandoned: no latency or token figures
        self._m.e2e.labels(self._model).observe(time.monotonic() - self._arrived)
        self._m.prompt_tokens.labels(self._model).inc(prompt_tokens)
        self._m.generation_tokens.labels(self._model).inc(completion_tokens)
        for reason in finish_reasons:
            self._m.successes.labels(self._model, reason).inc()


class RuntimeCollector(Collector):
    """The runtime's gauges and counters, read when /metrics is scraped."""

    def __init__(self) -> None:
        self.runtime: RuntimeAPI | None = None

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        if runtime is None:
            return
        specs: list[tuple[str, str, str, Any]] = [
            ("pie_kv_pages_total", "gauge", "KV cache pages in the pool.", lambda m, s: m.pages_total),
            ("pie_kv_pages_used", "gauge", "KV cache pages in use.", lambda m, s: m.pages_used),
            ("pie_tokens_processed", "counter", "Tokens run through the engine.", lambda m, s: m.tokens_processed),
            ("pie_batches", "counter", "Engine batches executed.", lambda m, s: m.batches),
            ("pie_last_batch_seconds", "gauge", "Duration of the latest engine batch.",
             lambda m, s: m.last_batch_ms / 1000.0),
            ("pie:num_preemptions", "counter", "Contexts suspended for lack of KV pages.",
             lambda m, s: _sum(s, "suspensions")),
            ("pie:kv_swapped_out_pages", "counter", "KV pages swapped out to the host pool.",
             lambda m, s: _sum(s, "swapped_out_pages")),
            ("pie:kv_swapped_in_pages", "counter", "KV pages swapped back in from the host pool.",
             lambda m, s: _sum(s, "swapped_in_pages")),
            ("pie:prefix_cache_hits", "counter", "Tokens attached from the prefix cache instead of computed.",
             lambda m, s: _sum(s, "cached_tokens")),
            ("pie:prefix_cache_hit_rate", "gauge", "Prefix-cache hit tokens / tokens passes asked for.",
             lambda m, s: _hit_rate(s)),
        ]
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help, labels=["model"])
            for name, kind, help, _ in specs]
        for model in runtime.models():
            stats = _scheduler_stats(runtime, model.name)
            for family, (_, _, _, read) in zip(families, specs, strict=True):
                family.add_metric([model.name], float(read(model, stats)))
        yield from families
        by_status = GaugeMetricFamily("pie_processes", "Inferlet processes the runtime holds, by status.",
                                      labels=["status"])
        counts: dict[str, int] = {}
        for process in runtime.processes():
            counts[process.status] = counts.get(process.status, 0) + 1
        for status, count in sorted(counts.items()):
            by_status.add_metric([status], count)
        yield by_status


def _scheduler_stats(runtime: RuntimeAPI, name: str) -> list[Any]:
    """Every data-parallel group's SchedulerStats of model `name` (none for runtimes that hide them)."""
    model_of = getattr(runtime, "model", None)
    if model_of is None:
        return []
    try:
        groups = model_of(name).groups
    except (KeyError, AttributeError):
        return []
    return [g.scheduler.stats for g in groups]


def _sum(stats: list[Any], field: str) -> float:
    return float(sum(getattr(s, field, 0) for s in stats))


def _hit_rate(stats: list[Any]) -> float:
    hits = _sum(stats, "cached_tokens")
    total = hits + _sum(stats, "tokens_processed")
    return hits / total if total else 0.0
