"""Messages between inferlets of the same user.

- `push(topic, msg)` / `await pull(topic)`: a work queue; each message goes to
  exactly one puller, in FIFO order.
- `broadcast(topic, msg)` / `subscribe(topic)`: every current subscriber gets
  a copy (slow subscribers may drop old messages).

    with messaging.subscribe("results") as sub:
        async for message in sub:
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from inferlet._host import Host, get_host


def push(topic: str, message: str) -> None:
    get_host().push(topic, message)


async def pull(topic: str) -> str:
    return await get_host().pull(topic)


def broadcast(topic: str, message: str) -> None:
    get_host().broadcast(topic, message)


def subscribe(topic: str) -> Subscription:
    host = get_host()
    return Subscription(host, host.subscribe(topic), topic)


class Subscription:
    def __init__(self, host: Host, handle: int, topic: str) -> None:
        self._host = host
        self._handle = handle
        self.topic = topic
        self._closed = False

    async def next(self) -> str | None:
        """The next broadcast, or None after `unsubscribe`."""
        if self._closed:
            return None
        return await self._host.sub_next(self._handle)

    def unsubscribe(self) -> None:
        if not self._closed:
            self._closed = True
            self._host.unsubscribe(self._handle)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        message = await self.next()
        if message is None:
            raise StopAsyncIteration
        return message

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unsubscribe()
