"""`RemoteHost`: the `inferlet._host.Host` of a sandboxed inferlet, forwarding every call to the runtime.

Each call is one `call` frame and one `reply` frame. Synchronous Host calls block the inferlet's thread
until their reply (one round trip over a local socketpair); asynchronous ones await a future, so many
can be in flight at once (`asyncio.gather` over several forward passes). A reader thread owns the
receiving side and hands each reply to its waiter.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from inferlet._host import Host, HostError
from pie.runtime.sandbox.wire import pack, recv_frame

# name -> is_async, for every method of the Host protocol (the runtime serves exactly these).
HOST_METHODS: dict[str, bool] = {
    name: inspect.iscoroutinefunction(fn) for name, fn in vars(Host).items()
    if callable(fn) and not name.startswith("_")
}
EXIT_RUNTIME_GONE = 70


class _Waiter:
    """A synchronous call's reply slot."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] = {}


class RemoteHost:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter | asyncio.Future[Any]] = {}
        self._lock = threading.Lock()  # guards _waiting between the inferlet's and the reader thread
        self._reader = threading.Thread(target=self._read, name="sandbox-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def post(self, frame: dict[str, Any]) -> None:
        """Send one raw frame (events, done). Not `send`: that is the Host's session call."""
        self._sock.sendall(pack(frame))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in HOST_METHODS:
            raise AttributeError(name)
        if HOST_METHODS[name]:
            async def call_async(*args: Any) -> Any:
                return await self._call_async(name, list(args))
            return call_async
        return lambda *args: self._call(name, list(args))

    def _call(self, method: str, args: list[Any]) -> Any:
        call_id, waiter = next(self._ids), _Waiter()
        with self._lock:
            self._waiting[call_id] = waiter
        self.post({"t": "call", "id": call_id, "m": method, "a": args})
        waiter.done.wait()
        return _result(waiter.reply)

    async def _call_async(self, method: str, args: list[Any]) -> Any:
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            self._waiting[call_id] = future
        self.post({"t": "call", "id": call_id, "m": method, "a": args})
        try:
            return _result(await future)
        except asyncio.CancelledError:
            with self._lock:
                self._waiting.pop(call_id, None)
            self.post({"t": "cancel", "id": call_id})
            raise

    def _read(self) -> None:
        while True:
            message = recv_frame(self._sock)
            if message is None:
                os._exit(EXIT_RUNTIME_GONE)  # the runtime closed the connection: nothing left to do
            if message.get("t") != "reply":
                continue
            with self._lock:
                waiter = self._waiting.pop(int(message["id"]), None)
            if isinstance(waiter, _Waiter):
                waiter.reply = message
                waiter.done.set()
            elif waiter is not None:
                self._loop.call_soon_threadsafe(_resolve, waiter, message)


def _resolve(future: asyncio.Future[Any], message: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(message)


def _result(reply: dict[str, Any]) -> Any:
    if not reply.get("ok"):
        raise HostError(str(reply.get("e", "host call failed")))
    return reply.get("v")
