"""Messaging between inferlets: work queues (push/pull) and pub/sub (broadcast/subscribe).

Topics are scoped per user: two users' "jobs" topics never meet. In memory,
lost on shutdown (as in Pie).

- push/pull: a FIFO queue per topic; each message goes to exactly one puller,
  waiting pullers are served in arrival order.
- broadcast/subscribe: every subscription of the topic gets its own copy. No
  backpressure: a subscription holds at most `max_subscription_backlog`
  messages and drops the oldest beyond that (counted in `dropped`).
- bytes: everything one user's topics hold (queued messages and subscription
  backlogs) counts against `[runtime] max_message_bytes_per_user`; a push over
  it is refused with MessagingError naming the key, a broadcast drops the
  subscription's oldest messages (or the new one).

An instance talks through its `Mailbox` (`bus.mailbox(username)`), which
owns its subscriptions as integer handles, the shape the Host API uses, and
releases them all in `close()` when the instance ends.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field

from pie.errors import MessagingError
from pie.runtime.quotas import ByteQuota, size_of


@dataclass(eq=False)
class Subscription:
    """One subscriber's copy of a topic's broadcasts; its backlog counts in its user's `quota`."""

    key: tuple[str, str]
    backlog: int
    quota: ByteQuota
    messages: collections.deque[str] = field(default_factory=collections.deque)
    dropped: int = 0
    closed: bool = False
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, message: str) -> None:
        user, n = self.key[0], size_of(message)
        while self.messages and (len(self.messages) >= self.backlog or not self.quota.fits(user, n)):
            self._pop()
            self.dropped += 1
        if not self.quota.fits(user, n):
            self.dropped += 1
            return
        self.messages.append(message)
        self.quota.take(user, n)
        self._wakeup.set()

    async def next(self) -> str | None:
        """The next message, or None once the subscription is closed and drained."""
        while not self.messages:
            if self.closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._pop()

    def close(self) -> None:
        """Unsubscribed: the backlog stops counting in the quota (it goes with this object) but can still
        be read to the end."""
        if not self.closed:
            self.quota.give(self.key[0], sum(size_of(m) for m in self.messages))
        self.closed = True
        self._wakeup.set()

    def _pop(self) -> str:
        message = self.messages.popleft()
        if not self.closed:
            self.quota.give(self.key[0], size_of(message))
        return message


class MessageBus:
    def __init__(self, *, max_queue: int = 10_000, max_subscription_backlog: int = 1_000,
                 max_bytes_per_user: int = 0) -> None:
        self.max_queue = max_queue
        self.max_subscription_backlog = max_subscription_backlog
        self.quota = ByteQuota(max_bytes_per_user, "max_message_bytes_per_user")
        self._queues: dict[tuple[str, str], collections.deque[str]] = {}
        self._pullers: dict[tuple[str, str], collections.deque[asyncio.Future[str]]] = {}
        self._subscribers: dict[tuple[str, str], set[Subscription]] = {}

    def mailbox(self, username: str) -> Mailbox:
        return Mailbox(self, username)

    # -- queues --
    def push(self, username: str, topic: str, message: str) -> None:
        key = (username, topic)
        waiting = self._pullers.get(key)
        while waiting:
            puller = waiting.popleft()
            if not puller.done():
                puller.set_result(message)
                return
        queue = self._queues.setdefault(key, collections.deque())
        if len(queue) >= self.max_queue:
            raise MessagingError(f"topic {topic!r} holds {len(queue)} unpulled messages (the limit); "
                                 "pull them or use broadcast for fire-and-forget")
        n = size_of(message)
        if not self.quota.fits(username, n):
            if not queue:
                del self._queues[key]
            raise MessagingError(self.quota.over(username, n, f"pushing a message to topic {topic!r}"))
        queue.append(message)
        self.quota.take(username, n)

    async def pull(self, username: str, topic: str) -> str:
        key = (username, topic)
        queue = self._queues.get(key)
        if queue:
            message = queue.popleft()
            self.quota.give(username, size_of(message))
            if not queue:
                del self._queues[key]
            return message
        puller: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pullers.setdefault(key, collections.deque()).append(puller)
        try:
            return await puller
        except asyncio.CancelledError:
            # Delivered just before the cancellation landed: give the message back, first in line.
            if puller.done() and not puller.cancelled():
                self._queues.setdefault(key, collections.deque()).appendleft(puller.result())
                self.quota.take(username, size_of(puller.result()))
            raise
        finally:
            waiting = self._pullers.get(key)
            if waiting is not None and not waiting:
                del self._pullers[key]

    # -- pub/sub --
    def broadcast(self, username: str, topic: str, message: str) -> int:
        """Deliver to every current subscription; returns how many got it."""
        subscribers = self._subscribers.get((username, topic), ())
        for sub in subscribers:
            sub.deliver(message)
        return len(subscribers)

    def subscribe(self, username: str, topic: str) -> Subscription:
        sub = Subscription((username, topic), self.max_subscription_backlog, self.quota)
        self._subscribers.setdefault(sub.key, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        subscribers = self._subscribers.get(sub.key)
        if subscribers is not None:
            subscribers.discard(sub)
            if not subscribers:
                del self._subscribers[sub.key]

    def stats(self) -> dict[str, int]:
        return {"queued": sum(len(q) for q in self._queues.values()),
                "pullers": sum(len(p) for p in self._pullers.values()),
                "subscriptions": sum(len(s) for s in self._subscribers.values())}


class Mailbox:
    """One instance's view of the bus: its username's topics and its own subscription handles."""

    def __init__(self, bus: MessageBus, username: str) -> None:
        self._bus = bus
        self.username = username
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)

    def push(self, topic: str, message: str) -> None:
        self._bus.push(self.username, topic, message)

    async def pull(self, topic: str) -> str:
        return await self._bus.pull(self.username, topic)

    def broadcast(self, topic: str, message: str) -> None:
        self._bus.broadcast(self.username, topic, message)

    def subscribe(self, topic: str) -> int:
        handle = next(self._ids)
        self._subs[handle] = self._bus.subscribe(self.username, topic)
        return handle

    async def sub_next(self, handle: int) -> str | None:
        return await self._sub(handle).next()

    def unsubscribe(self, handle: int) -> None:
        self._bus.unsubscribe(self._sub(handle))
        del self._subs[handle]

    def close(self) -> None:
        """Release every subscription (the instance ended)."""
        for handle in list(self._subs):
            self.unsubscribe(handle)

    def _sub(self, handle: int) -> Subscription:
        sub = self._subs.get(handle)
        if sub is None:
            raise MessagingError(f"no subscription {handle} in this instance (unsubscribed already?)")
        return sub
