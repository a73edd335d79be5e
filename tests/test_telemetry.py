"""Telemetry: spans reach the exporter with their attributes and service name; disabled is a no-op."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pie import telemetry


def test_spans_reach_the_exporter_with_attributes_and_service_name() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=True, service_name="pie-test", exporter=exporter) as on:
        assert on and telemetry.enabled()
        with telemetry.span("engine.batch", num_requests=3, num_tokens=40, pages=[1, 2], note=None) as span:
            span.set("num_output_tokens", 3)
            span.set("device", object())  # anything else travels as text
    assert not telemetry.enabled()
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "engine.batch"
    assert finished.resource.attributes["service.name"] == "pie-test"
    attrs = dict(finished.attributes or {})
    assert attrs["num_requests"] == 3 and attrs["num_tokens"] == 40 and attrs["num_output_tokens"] == 3
    assert list(attrs["pages"]) == [1, 2] and "note" not in attrs and isinstance(attrs["device"], str)
    assert finished.end_time is not None and finished.end_time >= finished.start_time


def test_nested_spans_are_parent_and_child() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=True, exporter=exporter), telemetry.span("outer"), telemetry.span("inner"):
        pass
    inner, outer = exporter.get_finished_spans()
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id


def test_an_exception_marks_the_span_and_propagates() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=True, exporter=exporter), pytest.raises(ValueError):  # noqa: SIM117
        with telemetry.span("engine.batch"):
            raise ValueError("bad batch")
    (finished,) = exporter.get_finished_spans()
    assert not finished.status.is_ok
    assert finished.events[0].name == "exception"


def test_disabled_records_nothing() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=False, exporter=exporter) as on:
        assert not on
        with telemetry.span("engine.batch", num_tokens=1) as span:
            span.set("x", 1)
    with telemetry.span("outside"):  # no configured block at all
        pass
    assert exporter.get_finished_spans() == ()
