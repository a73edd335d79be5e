"""OpenTelemetry tracing: OTLP export when `[telemetry] enabled`, a no-op otherwise.

The server opens `configured(...)` once for its lifetime; everything else
just calls `span(name, **attrs)`:

    with telemetry.span("engine.batch", num_requests=n, num_tokens=t) as span:
        result = await engine.forward(batch)
        span.set("num_output_tokens", len(result.tokens))

Spans emitted by pie:
- `inferlet.run`: one per process, launch to final event (process_id, program, username, outcome, status);
- `engine.batch`: one per engine batch (emitted by the runtime's scheduler; sizes as attributes).

When telemetry is off, or the `opentelemetry` packages are missing (install
the `otel` extra), `span` costs one global read and returns a shared no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None  # an opentelemetry Tracer while `configured` is open, else None


class SpanHandle:
    """A live span: `set` adds attributes; it ends when its `with` block does."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, key: str, value: Any) -> None:
        if self._span is not None:
            self._span.set_attribute(key, _attribute(value))


_NOOP = SpanHandle(None)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[SpanHandle]:
    tracer = _tracer
    if tracer is None:
        yield _NOOP
        return
    attrs = {k: _attribute(v) for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(name, attributes=attrs) as otel_span:
        yield SpanHandle(otel_span)


def enabled() -> bool:
    return _tracer is not None


@contextmanager
def configured(*, enabled: bool, service_name: str = "pie", endpoint: str = "http://localhost:4317",
               exporter: Any = None) -> Iterator[bool]:
    """Install a tracer for the duration of the block; yields whether spans are recorded.

    `exporter` replaces the OTLP exporter (tests pass the SDK's `InMemorySpanExporter`); spans then go
    out synchronously. Not re-entrant: one server per process installs it.
    """
    global _tracer
    assert _tracer is None, "telemetry.configured is already open"
    provider = _provider(service_name, endpoint, exporter) if enabled else None
    if provider is None:
        yield False
        return
    _tracer = provider.get_tracer("pie")
    try:
        yield True
    finally:
        _tracer = None
        provider.shutdown()  # flushes what the batch processor still holds


def _provider(service_name: str, endpoint: str, exporter: Any) -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("telemetry is enabled but the opentelemetry SDK is not installed; install pie[otel]. "
                    "Running without tracing")
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("telemetry is enabled but the OTLP exporter is not installed; install pie[otel]. "
                    "Running without tracing")
        return None
    otlp = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(otlp))
    log.info("telemetry: exporting spans of service %r to %s", service_name, endpoint)
    return provider


def _attribute(value: Any) -> Any:
    """OpenTelemetry takes str, bool, int, float and lists of them; anything else travels as text."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str | bool | int | float) for v in value):
        return list(value)
    return str(value)
