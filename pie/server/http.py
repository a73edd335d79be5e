"""The HTTP side of the server: one aiohttp application on one port.

- `GET /v1/ws`: the WebSocket protocol (`session.py`);
- `GET /health`: 200 `{"status": "ok"}` while serving (plus a summary, when auth is off or the
  caller sends the internal token), 503 while shutting down;
- `GET /metrics`: Prometheus text exposition;
- `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions`, `/v1/completions`: the OpenAI-compatible
  API (`openai.py`); `/v1/messages`, `/v1/messages/count_tokens`: Anthropic's (`api/anthropic.py`);
  `/v1/responses`: OpenAI's Responses API (`api/responses.py`); `/v1beta/models/{model}:generateContent`,
  `:streamGenerateContent`, `:countTokens`: Gemini's (`api/gemini.py`).

Every error is a JSON body in the API's shape (`api/errors.py`); with API keys set, every route but
`/health` (and the WebSocket, which has its own handshake) needs one (`api/auth.py`).

aiohttp serves WebSockets, plain and streamed (SSE) HTTP on one port with
one event loop and leaves signal handling to us, which is why it was chosen
over `websockets` alone (no streamed HTTP responses) and uvicorn (its own
signal handling and lifecycle to fit around ours).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from pie.errors import InputError
from pie.server import logs, openai
from pie.server.api import anthropic, auth, gemini, responses
from pie.server.api.errors import json_errors
from pie.server.auth import bearer_matches
from pie.server.connections import first_request
from pie.server.metrics import CONTENT_TYPE
from pie.server.session import Session
from pie.server.state import STATE, ServerState
from pie.wire.protocol import WS_PATH

log = logging.getLogger(__name__)

SOCKETS = web.AppKey("sockets", set)  # the open WebSocketResponses
STARTED_AT = web.AppKey("started_at", float)


def build_app(state: ServerState) -> web.Application:
    ring = auth.KeyRing.from_entries(state.options.api_keys, enable_auth=state.options.enable_auth,
                                     metrics_public=state.options.metrics_public, internal_token=state.auth.token)
    if ring.keys and not state.options.enable_auth:
        log.warning("api_keys protect the HTTP routes, but enable_auth is off: the WebSocket (%s) takes anyone "
                    "who can reach the port. Set enable_auth = true to require its SSH-key handshake", WS_PATH)
    app = web.Application(middlewares=[first_request, _count_requests, json_errors, _input_errors,
                                       auth.middleware(ring)])
    app[STATE] = state
    app[SOCKETS] = set()
    app[STARTED_AT] = time.time()
    app.router.add_get(WS_PATH, websocket)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    openai.add_routes(app.router)
    anthropic.add_routes(app.router)
    responses.add_routes(app)
    gemini.add_routes(app.router)
    return app


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.shutting_down:
        raise web.HTTPServiceUnavailable(text="the server is shutting down\n")
    ws = web.WebSocketResponse(max_msg_size=state.options.max_frame_bytes)
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    state.metrics.inc("pie_connections_total")
    state.metrics.connections_active += 1
    try:
        await Session(ws, state, peer=request.remote or "?").run()
    finally:
        state.metrics.connections_active -= 1
        sockets.discard(ws)
    return ws


async def close_sockets(app: web.Application, reason: str) -> None:
    """Close every client connection with 1001 (going away)."""
    sockets: set[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=reason.encode())


async def health(request: web.Request) -> web.Response:
    """`{"status": "ok"}` (503 `shutting_down`); with auth on, the details only for the internal token."""
    state = request.app[STATE]
    summary = {"status": "shutting_down" if state.shutting_down else "ok"}
    status = 503 if state.shutting_down else 200
    if state.options.enable_auth and not bearer_matches(request.headers.get("Authorization", ""), state.auth.token):
        return web.json_response(summary, status=status)
    body = {
        **summary,
        "uptime_s": round(time.time() - request.app[STARTED_AT], 3),
        "models": [m.name for m in state.runtime.models()],
        "processes_running": sum(p.status == "running" for p in state.runtime.processes()),
        "connections": state.metrics.connections_active,
    }
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    text = state.metrics.render(state.runtime)
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def _count_requests(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    status, started = 500, time.monotonic()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        if request.path != WS_PATH:
            request.app[STATE].metrics.inc("pie_http_requests_total", path=_route(request), status=str(status))
        user = request.get(auth.USER_KEY)
        logs.access_line(request.method, request.path, status, time.monotonic() - started,
                         user if isinstance(user, str) else None)


@web.middleware
async def _input_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Undecodable input (too deep, a lone surrogate, NaN, ...) that no route answered itself is a 400 in
    the OpenAI error shape, never a 500."""
    try:
        return await handler(request)
    except InputError as error:
        body = {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": None}}
        return web.json_response(body, status=400)


def _route(request: web.Request) -> str:
    """The matched route's path (bounded label values), or `other`."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"
