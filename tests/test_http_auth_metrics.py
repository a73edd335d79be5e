"""API keys on every HTTP route, the user each key runs as, and /metrics through prometheus_client's own
parser, against a real server on the tiny model."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from server_support import MODEL, running_server

from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
HELLO = [{"role": "user", "content": "Hello"}]
BOB_HASH = hashlib.sha256(b"sk-bob").hexdigest()
ROUTES = [("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None), ("GET", "/metrics", None),
          ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2}),
          ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
          ("GET", "/v1/nothing", None)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server(api_keys=("alice=sk-alice", f"sha256:{BOB_HASH}")) as server:
        yield server


async def test_every_route_but_health_needs_a_key(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
        assert (await http.get("/health")).status_code == 200
        for method, path, body in ROUTES:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}):
                response = await http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
            good = await http.request(method, path, json=body, headers={"Authorization": "Bearer sk-alice"})
            assert good.status_code == (404 if path == "/v1/nothing" else 200), (path, good.text)
            by_header = await http.request(method, path, json=body, headers={"x-api-key": "sk-bob"})
            assert by_header.status_code == good.status_code


async def test_each_key_runs_as_its_own_user(server: Server) -> None:
    for key in ("sk-alice", "sk-bob"):
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key=key, max_retries=0) as client:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert server.state is not None
    users = {p.username for p in server.state.runtime.processes()}
    assert {"alice", f"key:{BOB_HASH[:12]}"} <= users and "openai" not in users


async def test_metrics_parse_and_have_the_histograms(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="sk-alice", max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                                      stream=True)
        _ = [c async for c in stream]
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        text = (await http.get("/metrics", headers={"Authorization": "Bearer sk-alice"})).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("pie:time_to_first_token_seconds", "pie:inter_token_latency_seconds",
                 "pie:e2e_request_latency_seconds", "pie:request_queue_time_seconds"):
        assert families[name].type == "histogram"
        count = next(s.value for s in families[name].samples if s.name.endswith("_count")
                     and s.labels == {"model": MODEL})
        assert count >= 2, name
    assert families["pie:num_requests_running"].type == "gauge"
    gauges = {s.name: s.value for s in families["pie:num_requests_running"].samples}
    assert gauges == {"pie:num_requests_running": 0.0}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("pie:generation_tokens_total", (("model", MODEL),))] >= 2
    assert samples[("pie:prompt_tokens_total", (("model", MODEL),))] > 0
    assert ("pie:prefix_cache_hit_rate", (("model", MODEL),)) in samples
    assert ("pie:num_preemptions_total", (("model", MODEL),)) in samples
    assert samples[("pie_kv_pages_total", (("model", MODEL),))] == 256


async def test_enable_auth_without_keys_explains_how_to_add_one() -> None:
    from server_support import tiny_runtime_config

    async with running_server(tiny_runtime_config(), enable_auth=True,  # noqa: SIM117
                              authenticator=_open_websocket_auth()) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            response = await http.get("/v1/models")
            health = await http.get("/health")
    assert response.status_code == 401 and "api_keys" in response.json()["error"]["message"]
    assert health.status_code == 200


async def test_metrics_public_opts_out() -> None:
    async with running_server(api_keys=("sk-x",), metrics_public=True) as server:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.get("/metrics")).status_code == 200
            assert (await http.get("/v1/models")).status_code == 401


def _open_websocket_auth():  # type: ignore[no-untyped-def]
    """An authenticator with SSH-key auth on and an empty keystore (the WebSocket side is not under test)."""
    from pie.server.auth import Authenticator

    class NoKeys:
        def has_user(self, username: str) -> bool:
            return False

        def verify(self, username: str, message: bytes, signature: bytes) -> bool:
            return False

    return Authenticator(enabled=True, keys=NoKeys(), token="t")


async def test_banner_access_log_and_json_lines(caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from pie.server.logs import JsonFormatter

    caplog.set_level(logging.INFO)
    async with running_server() as server:  # noqa: SIM117
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            await http.get("/v1/nothing")
    banner = next(r for r in caplog.records if r.name == "pie.server" and r.getMessage().startswith("model "))
    assert "device cpu" in banner.getMessage() and "KV 256 pages" in banner.getMessage()
    assert "CUDA graphs off" in banner.getMessage()
    access = next(r for r in caplog.records if r.name == "pie.access" and "/v1/nothing" in r.getMessage())
    line = json.loads(JsonFormatter().format(access))
    assert (line["method"], line["path"], line["status"], line["level"]) == ("GET", "/v1/nothing", 404, "info")
    assert line["user"] == "openai" and line["duration_ms"] >= 0
