"""API keys for the HTTP routes, and the user each request runs as.

Keys come from `[server] api_keys` in config.toml and from `PIE_API_KEY`. An entry is a key
(`sk-...`), a hash of one (`sha256:<64 hex>`, so the file need not hold the secret), or either after
a user name (`alice=sk-...`, `alice=sha256:...`). A request sends its key as `Authorization: Bearer
<key>` (OpenAI clients), `x-api-key: <key>` (Anthropic clients), or `x-goog-api-key: <key>` or
`?key=<key>` (Gemini clients).

When keys are set, every route except `/health` needs one (`/metrics` too, unless
`[server] metrics_public = true`); the WebSocket keeps its own SSH-key handshake (`enable_auth`).
A request runs as its key's user (the name given, else `key:<first 12 hex of the key's sha256>`),
so each key has its own snapshots and processes. Without keys HTTP requests run as user `openai`;
with `enable_auth` but no keys the HTTP API answers 401 saying how to add one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pie.errors import ConfigError
from pie.server.api.errors import Handler, error_body
from pie.server.openai_schema import OpenAIError
from pie.wire.protocol import WS_PATH

ANONYMOUS_USER = "openai"
ENV_KEY = "PIE_API_KEY"
# request[USER_KEY]: the user a request runs as (aiohttp >= 3.13 wants typed keys; older ones take a str)
USER_KEY: Any = web.RequestKey("pie_user", str) if hasattr(web, "RequestKey") else "pie_user"
_HASH = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_NAME = re.compile(r"^[A-Za-z0-9_.@:\-]{1,64}$")
ARRIVED_KEY: Any = web.RequestKey("pie_arrived", float) if hasattr(web, "RequestKey") else "pie_arrived"
OPEN_PATHS = frozenset({"/health", WS_PATH})


@dataclass(frozen=True)
class ApiKey:
    user: str
    digest: bytes  # sha256 of the key


class KeyRing:
    def __init__(self, keys: Iterable[ApiKey], *, required_without_keys: bool = False,
                 metrics_public: bool = False, internal_token: str | None = None) -> None:
        self.keys = tuple(keys)
        # The server's per-start token (what `pie run` holds) also gets in, as the anonymous HTTP user.
        self._internal = hashlib.sha256(internal_token.encode()).digest() if internal_token else None
        self.required_without_keys = required_without_keys  # enable_auth with no keys: refuse HTTP
        self.metrics_public = metrics_public

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, env: dict[str, str] | None = None,
                     enable_auth: bool = False, metrics_public: bool = False,
                     internal_token: str | None = None) -> KeyRing:
        values = list(entries)
        env_key = (env if env is not None else os.environ).get(ENV_KEY, "").strip()
        if env_key:
            values.append(env_key)
        return cls([parse_entry(v) for v in values], required_without_keys=enable_auth,
                   metrics_public=metrics_public, internal_token=internal_token if enable_auth else None)

    @property
    def active(self) -> bool:
        return bool(self.keys) or self.required_without_keys

    def user_for(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).digest()
        if self._internal is not None and hmac.compare_digest(self._internal, digest):
            return ANONYMOUS_USER
        for entry in self.keys:
            if hmac.compare_digest(entry.digest, digest):
                return entry.user
        return None


def parse_entry(entry: str) -> ApiKey:
    name, sep, secret = entry.partition("=")
    if not sep or not _NAME.match(name) or entry.startswith("sha256:"):
        name, secret = "", entry
    secret = secret.strip()
    if not secret:
        raise ConfigError("an api_keys entry is empty; give a key, sha256:<hex> of one, or name=key")
    match = _HASH.match(secret)
    digest = bytes.fromhex(match.group(1)) if match else hashlib.sha256(secret.encode()).digest()
    return ApiKey(name or f"key:{digest.hex()[:12]}", digest)


def _presented(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    key = request.headers.get("x-api-key") or request.headers.get("x-goog-api-key") or request.query.get("key")
    return key.strip() if key else None


def middleware(ring: KeyRing) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[ARRIVED_KEY] = time.monotonic()  # the latency metrics count from here
        if request.path in OPEN_PATHS or not ring.active or (request.path == "/metrics" and ring.metrics_public):
            request[USER_KEY] = ANONYMOUS_USER
            return await handler(request)
        key = _presented(request)
        user = ring.user_for(key) if key else None
        if user is None and not ring.keys:
            return _refuse(request, "authentication is on (enable_auth) but no API keys are configured for "
                                    "HTTP: add `api_keys = [\"name=sk-...\"]` under [server] in config.toml, or "
                                    f"set {ENV_KEY}")
        if user is None:
            what = "a wrong API key" if key else "no API key"
            return _refuse(request, f"{what}: send `Authorization: Bearer <key>` (or `x-api-key: <key>`) with "
                                    "one of the server's api_keys")
        request[USER_KEY] = user
        return await handler(request)

    return check_key


def _refuse(request: web.Request, message: str) -> web.Response:
    return web.json_response(error_body(request.path, 401, message, code="invalid_api_key",
                                        kind="invalid_request_error"), status=401,
                             headers={"WWW-Authenticate": "Bearer"})


def user_of(request: web.Request) -> str:
    """The user the request runs as (set by the middleware)."""
    user = request.get(USER_KEY)
    if not isinstance(user, str):
        raise OpenAIError("the request was not authenticated", status=401, code="invalid_api_key")
    return user
