"""Prometheus metrics: the server's own counters plus runtime gauges read at scrape time.

The text exposition format (version 0.0.4) is small enough to write by hand,
which keeps the counters per server instance instead of in a process-global
registry (what `prometheus_client` would use).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from pie.runtime.api import RuntimeAPI

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge"]
    help: str


COUNTERS = {
    spec.name: spec
    for spec in (
        MetricSpec("pie_connections_total", "counter", "WebSocket connections accepted."),
        MetricSpec("pie_requests_total", "counter", "Client messages handled, by type."),
        MetricSpec("pie_protocol_errors_total", "counter",
                   "Refused frames and requests (malformed, oversized, unknown, bad arguments)."),
        MetricSpec("pie_auth_failures_total", "counter", "Refused authentication attempts."),
        MetricSpec("pie_processes_launched_total", "counter", "Inferlet processes launched, by program."),
        MetricSpec("pie_process_events_total", "counter", "Process events streamed to clients, by kind."),
        MetricSpec("pie_http_requests_total", "counter", "HTTP API requests, by path and status."),
    )
}


class Metrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.connections_active = 0

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        assert name in COUNTERS, f"unknown counter {name}"
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, runtime: RuntimeAPI | None) -> str:
        lines: list[str] = []
        for spec in COUNTERS.values():
            _series(lines, spec, self._values.get(spec.name, {}))
        _series(lines, MetricSpec("pie_connections_active", "gauge", "Open WebSocket connections."),
                {(): float(self.connections_active)})
        if runtime is not None:
            _runtime_gauges(lines, runtime)
        return "\n".join(lines) + "\n"


def _runtime_gauges(lines: list[str], runtime: RuntimeAPI) -> None:
    per_model: dict[str, dict[Labels, float]] = defaultdict(dict)
    for model in runtime.models():
        key: Labels = (("model", model.name),)
        per_model["pie_kv_pages_total"][key] = model.pages_total
        per_model["pie_kv_pages_used"][key] = model.pages_used
        per_model["pie_tokens_processed_total"][key] = model.tokens_processed
        per_model["pie_batches_total"][key] = model.batches
        per_model["pie_last_batch_seconds"][key] = model.last_batch_ms / 1000.0
    specs = (
        MetricSpec("pie_kv_pages_total", "gauge", "KV cache pages in the pool."),
        MetricSpec("pie_kv_pages_used", "gauge", "KV cache pages in use."),
        MetricSpec("pie_tokens_processed_total", "counter", "Tokens run through the engine."),
        MetricSpec("pie_batches_total", "counter", "Engine batches executed."),
        MetricSpec("pie_last_batch_seconds", "gauge", "Duration of the latest engine batch."),
    )
    for spec in specs:
        _series(lines, spec, per_model.get(spec.name, {}))
    by_status: dict[Labels, float] = defaultdict(float)
    for process in runtime.processes():
        by_status[(("status", process.status),)] += 1
    _series(lines, MetricSpec("pie_processes", "gauge", "Inferlet processes the runtime holds, by status."),
            dict(by_status))


def _series(lines: list[str], spec: MetricSpec, series: dict[Labels, float]) -> None:
    lines.append(f"# HELP {spec.name} {spec.help}")
    lines.append(f"# TYPE {spec.name} {spec.kind}")
    for labels, value in sorted(series.items()):
        lines.append(f"{spec.name}{_labels(labels)} {_number(value)}")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
