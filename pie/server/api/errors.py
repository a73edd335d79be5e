"""Every HTTP error as a JSON body in the shape of the API the path belongs to, never a traceback.

aiohttp answers unknown routes (404), wrong methods (405) and oversized bodies (413) with plain
text; this middleware turns those, and any unexpected exception (logged with its traceback on the
server, a 500 for the client), into OpenAI's `{"error": {message, type, param, code}}`,
Anthropic's `{"type": "error", "error": {type, message}}` under `/v1/messages`, or Gemini's
`{"error": {code, message, status, details}}` under `/v1beta/`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pie.wire.protocol import WS_PATH

log = logging.getLogger("pie.server.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          429: "rate_limit_error", 503: "overloaded_error"}


_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                  503: "UNAVAILABLE"}


def error_body(path: str, status: int, message: str, *, param: str | None = None,
               code: str | None = None, kind: str | None = None) -> dict[str, Any]:
    if path.startswith("/v1beta/"):
        error: dict[str, Any] = {"code": status, "message": message,
                                 "status": _GOOGLE_STATUS.get(status, "INTERNAL")}
        if param is not None:  # google.rpc.BadRequest names the field, as Gemini's own 400s do
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                 "fieldViolations": [{"field": param, "description": message}]}]
        return {"error": error}
    if path.startswith("/v1/messages"):
        anthropic_kind = _KINDS.get(status, "api_error")
        return {"type": "error", "error": {"type": anthropic_kind, "message": message}}
    openai_kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": openai_kind, "param": param, "code": code}}


def error_response(request: web.Request, status: int, message: str, **fields: Any) -> web.Response:
    return web.json_response(error_body(request.path, status, message, **fields), status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == WS_PATH:
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400 or error.content_type == "application/json":
            raise
        message = _message(request, error)
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        return web.json_response(error_body(request.path, error.status, message,
                                            code=_code(error.status)), status=error.status, headers=headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(error_body(request.path, 500, "internal server error (see the server log)"),
                                 status=500)


def _message(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"no route {request.method} {request.path}; see GET /v1/models, POST /v1/chat/completions"
    if error.status == 405:
        allowed = error.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    return error.text or error.reason or f"HTTP {error.status}"


def _code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
