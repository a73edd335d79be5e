"""Instances as the server sees them: events and attach, session inbox, messaging scope, limits, shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from runtime_support import argmax_at, forward, greedy, start_runtime
from timing import scaled, wait_for_async

from inferlet._host import HostError
from pie.runtime.api import Event
from pie.runtime.instance import Instance
from pie.runtime.runtime import Runtime, RuntimeLimits
from pie.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def runtime(tiny: Path) -> Any:
    rt = await start_runtime(tiny)
    yield rt
    await rt.shutdown(0)


async def drain(instance: Instance) -> list[Event]:
    return [e async for e in instance.events()]


async def test_events_are_buffered_until_attached_and_a_new_subscriber_takes_over(runtime: Runtime) -> None:
    sent, step = asyncio.Event(), asyncio.Event()

    async def body(instance: Instance) -> str:
        instance.host.send("one")
        instance.host.send_file(b"\x00\x01")
        sent.set()
        await step.wait()
        instance.host.send("two")
        return "done"

    proc = runtime.spawn(body, program="events", username="alice")
    await sent.wait()  # sent while detached: the events wait in the buffer
    first = proc.events()
    assert await anext(first) == Event("message", "one")
    second = proc.events()  # an attach elsewhere takes over
    assert await anext(second) == Event("file", b"\x00\x01")
    with pytest.raises(StopAsyncIteration):  # the replaced subscriber ends
        await anext(first)
    step.set()
    assert [e async for e in second] == [Event("message", "two"), Event("return", "done")]
    assert await drain(proc) == [Event("return", "done")]  # a late attach still learns the outcome
    assert proc.status == "finished" and await proc.wait() == Event("return", "done")


async def test_session_inbox_and_messaging_are_scoped_per_user(runtime: Runtime) -> None:
    async def echo(instance: Instance) -> str:
        host = instance.host
        text = await host.receive()
        data = await host.receive_file()
        host.push("jobs", f"{instance.username}:{text}")
        return f"{text}+{len(data)}"

    async def worker(instance: Instance) -> str:
        return await instance.host.pull("jobs")

    alice_worker = runtime.spawn(worker, program="w", username="alice")
    bob_worker = runtime.spawn(worker, program="w", username="bob")
    proc = runtime.spawn(echo, program="echo", username="alice")
    proc.send_message("hi")
    proc.send_file(b"abc")
    assert (await proc.wait()).value == "hi+3"
    assert (await alice_worker.wait()).value == "alice:hi"
    await asyncio.sleep(0.05)  # a window for a wrong delivery to show; a right one never comes, however long
    assert not bob_worker.done  # bob's "jobs" topic is not alice's
    await bob_worker.terminate()
    assert [p.id for p in runtime.processes("bob")] == [bob_worker.id]


async def test_limits_stop_an_instance_with_a_clear_error(tiny: Path) -> None:
    # The wall-time limit must stop `loop_forever` but not `hog_tokens` (9 passes), however slow the machine.
    wall_s = scaled(1.0)
    limits = RuntimeLimits(max_pages_per_instance=4, max_tokens_per_instance=8, max_wall_time_s=wall_s)
    runtime = await start_runtime(tiny, limits)

    async def hog_pages(host: Any) -> None:
        ctx = host.ctx_create("")
        host.ctx_reserve(ctx, 3)
        with pytest.raises(HostError, match="would hold 6 KV pages"):
            host.ctx_fork(ctx)  # a fork holds as many pages as its parent
        with pytest.raises(HostError, match="would hold 5 KV pages, over its limit of 4"):
            host.ctx_reserve(ctx, 2)

    async def hog_tokens(host: Any) -> None:
        await greedy(host, host.ctx_create(""), [1, 2, 3], 8)
        with pytest.raises(HostError, match="token budget used up: this instance sampled 8 of its 8"):
            await forward(host, host.ctx_create(""), [4], [argmax_at(0)])

    async def loop_forever(host: Any) -> None:
        while True:
            await asyncio.sleep(0.01)

    for body, expect in ((hog_pages, "return"), (hog_tokens, "return"), (loop_forever, "error")):
        async def wrapper(instance: Instance, body: Any = body) -> str:
            await body(instance.host)
            return "ok"

        final = await runtime.spawn(wrapper, program=body.__name__, username="u").wait()
        assert final.kind == expect, final.value
    assert f"wall-time limit of {wall_s:g} s" in str(final.value)
    # A launch's token budget can only lower the configured one.
    assert runtime.limits.for_instance(4).max_tokens == 4 and runtime.limits.for_instance(99).max_tokens == 8
    assert runtime.model().pool.num_used == 0
    await runtime.shutdown(0)


async def test_shutdown_terminates_what_is_left_and_frees_its_pages(tiny: Path) -> None:
    runtime = await start_runtime(tiny)

    async def forever(instance: Instance) -> str:
        host = instance.host
        ctx = host.ctx_create("")
        await greedy(host, ctx, [1, 2, 3], 100_000)
        return "never"

    procs = [runtime.spawn(forever, program="forever", username="u") for _ in range(3)]
    # Each holds at least its prompt's page once it runs: then shutdown has pages to free.
    await wait_for_async(lambda: runtime.model().pool.num_used >= 3, 30, "the three instances to hold pages")
    await runtime.shutdown(grace_s=0.1)
    for p in procs:
        final = await p.wait()
        assert (final.kind, p.status) == ("error", "terminated") and "shutting down" in str(final.value)
    assert runtime.model().pool.num_used == 0
    with pytest.raises(Exception, match="shutting down"):
        runtime.spawn(forever, program="late", username="u")


async def test_misbehaving_inferlets_fail_alone_while_a_good_one_finishes(tiny: Path) -> None:
    # No wall-time limit that `good` (24 greedy steps beside `loops`) might meet on a loaded machine: the
    # test stops `loops` itself once the others are done (the limit is test_limits_stop_an_instance_...'s).
    runtime = await start_runtime(tiny, RuntimeLimits(max_pages_per_instance=64))

    async def raises(host: Any) -> None:
        await forward(host, host.ctx_create(""), [1, 2, 3])
        raise ValueError("bad inferlet")

    async def loops(host: Any) -> None:  # passes forever, in constant memory
        ctx = host.ctx_create("")
        host.ctx_reserve(ctx, 1)
        while True:
            await host.ctx_forward(ctx, {"tokens": [1], "positions": [0]})
            host.ctx_truncate(ctx, 1)

    async def hogs_pages(host: Any) -> None:
        while True:
            host.ctx_reserve(host.ctx_create(""), 8)

    async def garbage_mask(host: Any) -> None:
        ctx = host.ctx_create("")
        host.ctx_reserve(ctx, 1)
        await host.ctx_forward(ctx, {"tokens": [1, 2], "positions": [0, 1], "attention_mask": [[0, 9], [1]]})

    async def good(host: Any) -> list[int]:
        return await greedy(host, host.ctx_create(""), [5, 6, 7], 24)

    outcome: dict[str, Any] = {}

    def spawn(fn: Any) -> Instance:
        async def body(instance: Instance) -> str:
            outcome[fn.__name__] = await fn(instance.host)
            return "ok"

        return runtime.spawn(body, program=fn.__name__, username="u")

    procs = {fn.__name__: spawn(fn) for fn in (raises, loops, hogs_pages, garbage_mask, good)}
    finals = {name: await p.wait() for name, p in procs.items() if name != "loops"}
    assert procs["loops"].status == "running"  # beside the others all along
    await procs["loops"].terminate("stopped by the test")
    finals["loops"] = await procs["loops"].wait()
    expect = {"raises": "ValueError: bad inferlet", "loops": "stopped by the test",
              "hogs_pages": "over its limit of 64", "garbage_mask": "covers 9 slots"}
    for name, why in expect.items():
        assert finals[name].kind == "error" and why in str(finals[name].value), (name, finals[name])
    assert finals["good"].kind == "return"
    solo = await start_runtime(tiny)
    box: dict[str, Any] = {}

    async def alone(instance: Instance) -> str:
        box["tokens"] = await good(instance.host)
        return "ok"

    await solo.spawn(alone, program="good", username="u").wait()
    assert outcome["good"] == box["tokens"]
    assert runtime.model().pool.num_used == 0
    runtime.check_integrity()
    await solo.shutdown(0)
    await runtime.shutdown(0)
