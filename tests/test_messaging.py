"""MessageBus semantics, and messaging between inferlets through the SDK and the runtime."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from inferlet_helpers import result, run_sdk, start_runtime
from timing import scaled

from inferlet import messaging
from pie.errors import MessagingError
from pie.runtime.messaging import MessageBus
from pie.tiny_model import ensure_tiny_model


async def test_queue_is_fifo_and_each_message_reaches_one_puller() -> None:
    bus = MessageBus()
    for i in range(6):
        bus.push("u", "jobs", f"m{i}")
    pulled = await asyncio.gather(*(bus.pull("u", "jobs") for _ in range(6)))
    assert pulled == [f"m{i}" for i in range(6)]

    waiting = [asyncio.ensure_future(bus.pull("u", "jobs")) for _ in range(3)]
    await asyncio.sleep(0)
    for i in range(3):
        bus.push("u", "jobs", f"late{i}")
    assert await asyncio.gather(*waiting) == ["late0", "late1", "late2"]  # waiting pullers in arrival order
    assert bus.stats() == {"queued": 0, "pullers": 0, "subscriptions": 0}


async def test_a_cancelled_puller_loses_no_message() -> None:
    bus = MessageBus()
    first = asyncio.ensure_future(bus.pull("u", "t"))
    await asyncio.sleep(0)
    bus.push("u", "t", "precious")  # delivered to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await bus.pull("u", "t") == "precious"


async def test_broadcast_fans_out_and_drops_oldest_for_slow_subscribers() -> None:
    bus = MessageBus(max_subscription_backlog=3)
    a, b = bus.subscribe("u", "news"), bus.subscribe("u", "news")
    other_user = bus.subscribe("v", "news")
    for i in range(5):
        assert bus.broadcast("u", "news", f"n{i}") == 2
    assert [await a.next() for _ in range(3)] == ["n2", "n3", "n4"] and a.dropped == 2
    assert await b.next() == "n2"
    bus.unsubscribe(b)
    assert b.closed and await b.next() == "n3"  # drains what it had, then ends
    assert await b.next() == "n4" and await b.next() is None
    assert not other_user.messages  # topics are per user


async def test_mailbox_close_releases_subscriptions_and_limits_are_clear() -> None:
    bus = MessageBus(max_queue=2)
    box = bus.mailbox("u")
    handle = box.subscribe("x")
    waiter = asyncio.ensure_future(box.sub_next(handle))
    await asyncio.sleep(0)
    box.close()
    assert await waiter is None and bus.stats()["subscriptions"] == 0
    with pytest.raises(MessagingError, match="no subscription"):
        await box.sub_next(handle)
    bus.push("u", "q", "1")
    bus.push("u", "q", "2")
    with pytest.raises(MessagingError, match="holds 2 unpulled messages"):
        bus.push("u", "q", "3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


async def test_producer_and_consumers_cooperate_through_the_runtime(tiny: Path) -> None:
    rt = await start_runtime(tiny)
    try:
        consumers = [asyncio.ensure_future(result(rt, "messaging-consumer", {"channel": "c1", "max_tokens": 4}))
                     for _ in range(2)]
        produced = await result(rt, "messaging-producer", {"channel": "c1", "consumers": 2,
                                                           "prompts": ["a", "b", "c", "d"]})
        handled = [r["handled"] for r in await asyncio.gather(*consumers)]
        assert len(produced["answers"]) == 4 and produced["progress_notices"] == 4
        assert sum(handled) == 4  # each job went to exactly one consumer
    finally:
        await rt.shutdown(0)


async def test_topics_are_scoped_per_user(tiny: Path) -> None:
    rt = await start_runtime(tiny)
    try:
        async def push() -> None:
            messaging.push("inbox", "for alice only")

        async def pull_within(seconds: float) -> str | None:
            try:
                return await asyncio.wait_for(messaging.pull("inbox"), timeout=seconds)
            except TimeoutError:
                return None

        await run_sdk(rt, push, username="alice")
        # A window for a wrong delivery to show (a right one never comes, however long); then alice's
        # message, which is already waiting, with a deadline only a stalled machine would meet.
        assert await run_sdk(rt, lambda: pull_within(0.2), username="eve") is None
        assert await run_sdk(rt, lambda: pull_within(scaled(10)), username="alice") == "for alice only"
    finally:
        await rt.shutdown(0)


async def test_subscriptions_end_with_their_instance(tiny: Path) -> None:
    rt = await start_runtime(tiny)
    try:
        async def listen() -> list[str]:
            got = []
            with messaging.subscribe("ping") as sub:
                messaging.broadcast("ping", "hello")
                async for message in sub:
                    got.append(message)
                    if len(got) == 1:
                        sub.unsubscribe()
            return got

        assert await run_sdk(rt, listen) == ["hello"]

        async def leak() -> None:
            messaging.subscribe("ping")  # never unsubscribed: the instance's end must do it

        await run_sdk(rt, leak)
        assert rt.bus.stats()["subscriptions"] == 0
    finally:
        await rt.shutdown(0)
