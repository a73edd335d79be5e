"""Connection hygiene below aiohttp: a cap on open connections and a deadline for the first request.

`ConnectionGuard` is the protocol factory the listening socket uses instead of
aiohttp's own (which it wraps):

- past `max_connections` open connections a new one is answered `503` and
  closed at once, so a flood can never use up the file descriptors that
  well-behaved clients and the runtime need;
- a connection must deliver its first request's headers within
  `header_timeout_s` (slow-header clients hold a descriptor for nothing);
  `request_started` (called by an HTTP middleware) lifts the deadline.

Idle keep-alive connections are closed by aiohttp's `keepalive_timeout`, and
WebSockets by their session (`pie.server.session`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for everything but client connections (model files, pipes, workers)

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s")


class ConnectionGuard:
    def __init__(self, runner: web.BaseRunner, *, max_connections: int, header_timeout_s: float) -> None:
        self._runner = runner  # its `server` (set up later) is aiohttp's protocol factory
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.active = 0
        self.refused = 0  # connections answered 503 since the start
        self.expired = 0  # connections closed for sending no headers in time
        self._waiting: dict[Any, _Guarded] = {}  # aiohttp handler -> its connection, until its first request

    def __call__(self) -> asyncio.Protocol:
        if self.active >= self.max_connections:
            self.refused += 1
            log.warning("refusing a connection: %d are open, the limit (max_connections)", self.active)
            return _Refused(self.max_connections)
        server = self._runner.server
        assert server is not None, "the runner is set up before its site accepts connections"
        self.active += 1
        return _Guarded(self, server())

    def request_started(self, handler: Any) -> None:
        """The connection of aiohttp handler `handler` has sent a request: lift its header deadline."""
        connection = self._waiting.pop(handler, None)
        if connection is not None:
            connection.cancel_deadline()


GUARD = web.AppKey("connection_guard", ConnectionGuard)


def fit_fd_limit(max_connections: int) -> int:
    """The connection cap this process can honour: raise the soft RLIMIT_NOFILE towards
    `max_connections + FD_RESERVE` (up to the hard limit); past what it allows, a lower cap (warned)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft >= wanted:
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning("max_connections = %d needs %d file descriptors but the limit is %d (hard limit %s): capping "
                "connections at %d; raise `ulimit -n` (LimitNOFILE= under systemd) or lower max_connections",
                max_connections, wanted, soft, hard, fitted)
    return fitted


@web.middleware
async def first_request(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Headers are in: lift the connection's header deadline (installed when the app has a GUARD)."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.request_started(request.protocol)
    return await handler(request)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard's bookkeeping around it."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._guard._waiting[self._inner] = self
        self._deadline = asyncio.get_running_loop().call_later(self._guard.header_timeout_s, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        self._guard._waiting.pop(self._inner, None)
        self._guard.active -= 1
        self._inner.connection_lost(exc)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self._guard.expired += 1
        log.info("closing a connection that sent no request headers within %g s (header_timeout_s)",
                 self._guard.header_timeout_s)
        if self._transport is not None:
            self._transport.abort()


class _Refused(asyncio.Protocol):
    """Answers 503 and closes: the client learns why instead of seeing a reset."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        text = (f"the server holds its limit of {self._limit} connections (max_connections); "
                "retry shortly\n").encode()
        transport.write(_BUSY % (len(text), text))  # type: ignore[attr-defined]
        transport.close()


class GuardedSite(web.BaseSite):
    """`web.SockSite` with a `ConnectionGuard` as the protocol factory."""

    def __init__(self, runner: web.AppRunner, sock: Any, guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self._sock = sock
        self.guard = guard
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard, sock=self._sock, backlog=self._backlog)
