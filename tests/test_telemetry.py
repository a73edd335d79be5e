"""Telemetry: spans reach the exporter with their attributes and service name; disabled is a no-op."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from server_support import running_server, wait_until

from pie import telemetry
from pie.client import PieClient, ProcessFailed


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


async def test_the_server_traces_each_inferlet_run() -> None:
    exporter = InMemorySpanExporter()
    with telemetry.configured(enabled=True, service_name="pie-test", exporter=exporter):
        async with running_server() as server, PieClient(server.url) as client:
            await client.authenticate("alice")
            done = await client.launch("text-completion", {"prompt": "Hi", "max_tokens": 4})
            await done.result()
            failed = await client.launch("text-completion", {"prompt": "Hi", "max_tokens": "lots"})
            with pytest.raises(ProcessFailed):
                await failed.result()
            await wait_until(lambda: len(_runs(exporter)) == 2, what="two inferlet.run spans")
    runs = {span.attributes["process_id"]: span for span in _runs(exporter)}
    ok, bad = runs[done.id], runs[failed.id]
    assert ok.attributes["program"] == "text-completion@0.1.0" and ok.attributes["username"] == "alice"
    assert (ok.attributes["outcome"], ok.attributes["status"]) == ("return", "finished")
    assert (bad.attributes["outcome"], bad.attributes["status"]) == ("error", "failed")
    assert ok.end_time > ok.start_time and ok.resource.attributes["service.name"] == "pie-test"


async def test_otlp_export_reaches_a_collector() -> None:
    """`[telemetry] enabled` with an endpoint: spans go over OTLP/gRPC to the collector listening there."""
    collector = _Collector()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        async with running_server(telemetry_enabled=True, telemetry_endpoint=f"http://127.0.0.1:{port}",
                                  telemetry_service_name="pie-otlp") as server, PieClient(server.url) as client:
            await client.authenticate("alice")
            await (await client.launch("text-completion", {"prompt": "Hi", "max_tokens": 2})).result()
        # leaving the server flushed the batch processor
    finally:
        grpc_server.stop(None)
    spans = [(resource.resource, span) for request in collector.requests for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert any(span.name == "inferlet.run" for _, span in spans)
    services = {a.value.string_value for resource, _ in spans for a in resource.attributes if a.key == "service.name"}
    assert services == {"pie-otlp"}


def _runs(exporter: InMemorySpanExporter) -> list:  # type: ignore[type-arg]
    return [s for s in exporter.get_finished_spans() if s.name == "inferlet.run"]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()
