"""The OpenAI-compatible HTTP API, served by the standard `openai-compat` inferlet on the same runtime.

Each request launches one `openai-compat` process (user `openai`) with the
validated request as its input; its `{"delta": ...}` messages become SSE
chunks (`stream: true`) and its return value the final object. The process is
terminated if the HTTP client goes away first, which frees its pages.

With `enable_auth` the endpoints take `Authorization: Bearer <token>`, the
server's per-start internal token.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pie.errors import ProgramError, RequestError
from pie.runtime.api import ProcessAPI
from pie.server import processes
from pie.server.openai_schema import (
    GenerationRequest,
    OpenAIError,
    chunk,
    full_response,
    parse_chat,
    parse_completion,
    usage_chunk,
)
from pie.server.safe_json import loads_limited
from pie.server.state import STATE, ServerState

PROGRAM = "openai-compat"
USERNAME = "openai"
Parser = Callable[[Any], GenerationRequest]


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", models)
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/completions", completions)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        _check_auth(request, state)
    except OpenAIError as error:
        return web.json_response(error.body(), status=error.status)
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "pie"} for m in state.runtime.models()]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat, "chatcmpl")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion, "cmpl")


async def _generate(request: web.Request, parse: Parser, id_prefix: str) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        _check_auth(request, state)
        req = parse(await _json_body(request))
        _check_model(state, req.model)
        # The standard inferlet by its content hash: no upload of the same name@version can stand in.
        program = state.runtime.standard_program(PROGRAM)
        process = await processes.launch(state, program, req.inferlet_input(), username=USERNAME)
    except OpenAIError as error:
        return web.json_response(error.body(), status=error.status)
    except (RequestError, ProgramError) as error:  # shutting down, openai-compat not installed, ...
        return web.json_response(OpenAIError(str(error), kind="server_error").body(), status=503)
    rid, created = f"{id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
    try:
        if req.stream:
            return await _stream(request, req, process, rid, created)
        return await _collect(req, process, rid, created)
    finally:
        if process.status == "running":  # the HTTP client left early
            await process.terminate("the HTTP client disconnected")


async def _collect(req: GenerationRequest, process: ProcessAPI, rid: str, created: int) -> web.Response:
    async for event in process.events():
        if event.kind == "return":
            return web.json_response(full_response(req, rid, created, _result(event.value)))
        if event.kind == "error":
            return web.json_response(_inferlet_error(event.value), status=500)
    final = await process.wait()  # events were taken over by someone else; the outcome still stands
    if final.kind == "return":
        return web.json_response(full_response(req, rid, created, _result(final.value)))
    return web.json_response(_inferlet_error(final.value), status=500)


async def _stream(request: web.Request, req: GenerationRequest, process: ProcessAPI, rid: str,
                  created: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(obj: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    if req.mode == "chat":
        await send(chunk(req, rid, created, None, role=True))
    async for event in process.events():
        if event.kind == "message":
            await send(chunk(req, rid, created, _delta(event.value)))
        elif event.kind == "return":
            result = _result(event.value)
            await send(chunk(req, rid, created, None if req.mode == "chat" else "", result.get("finish_reason")))
            if req.include_usage:
                await send(usage_chunk(req, rid, created, result))
        elif event.kind == "error":
            await send(_inferlet_error(event.value))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _check_auth(request: web.Request, state: ServerState) -> None:
    if not state.options.enable_auth:
        return
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip()
    if not (header.startswith("Bearer ") and hmac.compare_digest(token.encode(), state.auth.token.encode())):
        raise OpenAIError("authentication is on: send `Authorization: Bearer <token>` with the server's "
                          "token", status=401, code="invalid_api_key")


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=loads_limited)  # depth, NaN, surrogates: InputError, a 400
    except UnicodeDecodeError as error:
        raise OpenAIError(f"the request body is not JSON: {error}") from None


def _check_model(state: ServerState, model: str) -> None:
    served = [m.name for m in state.runtime.models()]
    if model not in served:
        raise OpenAIError(f"the model {model!r} is not served here; served: {', '.join(served)}",
                          status=404, param="model", code="model_not_found")


def _delta(value: str | bytes) -> str:
    text = value.decode() if isinstance(value, bytes) else value
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return text
    return str(message.get("delta", "")) if isinstance(message, dict) else text


def _result(value: str | bytes) -> dict[str, Any]:
    try:
        result = json.loads(value)
    except json.JSONDecodeError:
        return {"text": value if isinstance(value, str) else value.decode(), "finish_reason": "stop"}
    return result if isinstance(result, dict) else {"text": str(result), "finish_reason": "stop"}


def _inferlet_error(value: str | bytes) -> dict[str, Any]:
    text = value.decode() if isinstance(value, bytes) else value
    return OpenAIError(f"generation failed: {text}", kind="server_error").body()
