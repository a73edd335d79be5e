"""The WebSocket protocol against the real runtime on the tiny model: launch, stream, attach, signal,
files, per-user isolation, bad input, disconnects, health and metrics. One server for the module."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgpack
import pytest
import pytest_asyncio
import websockets
from server_support import MODEL, pages_used, running_server, wait_until
from timing import scaled

from pie.client import PieClient, ProcessFailed
from pie.errors import RequestError
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")

FILE_ECHO = b'''
from inferlet import session

async def main(input: dict) -> str:
    data = await session.receive_file()
    session.send_file(data[::-1])
    print("then", await session.receive())
    return str(len(data))
'''
FILE_ECHO_TOML = '[package]\nname = "file-echo"\nversion = "1.0.0"\n'


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    # A reconnect must beat the detach timeout on a loaded machine too; the reaping test waits it out.
    async with running_server(detach_timeout_s=scaled(1.0), max_frame_bytes=1024 * 1024) as server:
        yield server


async def connect(server: Server, user: str = "alice") -> PieClient:
    client = PieClient(server.url)
    await client.connect()
    await client.authenticate(user)
    return client


async def chat_turn(process, text: str) -> str:  # type: ignore[no-untyped-def]
    await process.send_message(text)
    event = await asyncio.wait_for(anext(aiter(process.events())), scaled(30))
    assert event.kind == "message", event
    return str(event.value)


async def test_text_completion_streams_to_return(server: Server) -> None:
    client = await connect(server)
    before = (await client.model_status())[MODEL]["tokens_processed"]
    process = await client.launch("text-completion", {"prompt": "Hello there", "max_tokens": 8, "stream": True})
    events = [e async for e in process.events()]
    await client.close()
    assert events[-1].kind == "return"
    deltas = "".join(str(e.value) for e in events if e.kind == "message")
    assert deltas == events[-1].value and len(events) > 1
    status = json.loads(await _query(server, "model_status"))[MODEL]
    assert status["tokens_processed"] > before and status["batches"] > 0
    assert pages_used(server) == 0


async def test_chat_over_signals_then_a_second_client_attaches_and_terminates(server: Server) -> None:
    first, second = await connect(server), await connect(server)
    process = await first.launch("chat", {"max_tokens": 6})
    assert await chat_turn(process, "hello") is not None
    taken = await second.attach(process.id)
    assert await chat_turn(taken, "and again") is not None
    assert pages_used(server) > 0  # the chat's KV cache lives between turns
    await taken.terminate()
    final = [e async for e in taken.events()][-1]
    assert final.kind == "error" and "terminated by client" in str(final.value)
    assert first._queues[process.id].empty()  # the first client's stream was taken over: nothing more there
    assert server.state.runtime.process(process.id).status == "terminated"  # type: ignore[union-attr]
    assert pages_used(server) == 0
    await first.close()
    await second.close()


async def test_users_see_and_touch_only_their_own_processes(server: Server) -> None:
    alice, bob = await connect(server, "alice"), await connect(server, "bob")
    process = await alice.launch("chat", {})
    assert process.id in {p["id"] for p in await alice.list_processes()}
    assert all(p["username"] == "bob" for p in await bob.list_processes())
    for attempt in (bob.attach(process.id), bob.terminate(process.id)):
        with pytest.raises(RequestError, match=f"no process '{process.id}' for user 'bob'"):
            await attempt
    await bob.signal(process.id, "hi from bob")
    await wait_until(lambda: bool(bob.protocol_errors), what="bob's protocol_error")
    assert "for user 'bob'" in bob.protocol_errors[0]
    await process.terminate()
    await alice.close()
    await bob.close()


async def test_upload_then_files_both_ways_checked_by_blake3(server: Server) -> None:
    client = await connect(server)
    assert not await client.check_program("file-echo@1.0.0")
    await client.install_program(FILE_ECHO, FILE_ECHO_TOML)
    assert await client.check_program("file-echo@1.0.0")
    process = await client.launch("file-echo@1.0.0")
    data = bytes(range(256)) * 2400  # 614,400 bytes: three 256 KiB chunks each way
    await process.send_file(data)
    events = process.events()
    file_event = await asyncio.wait_for(anext(events), scaled(30))
    assert file_event.kind == "file" and file_event.value == data[::-1]
    await process.send_message("done")
    rest = [e async for e in events]
    assert [(e.kind, e.value) for e in rest] == [("stdout", "then done\n"), ("return", str(len(data)))]
    await client.close()


async def test_bad_input_is_refused_to_that_client_only(server: Server) -> None:
    alice = await connect(server)
    running = await alice.launch("text-completion", {"prompt": "Keep going", "max_tokens": 24, "stream": True})
    async with websockets.connect(server.url, max_size=None) as ws:
        await ws.send(msgpack.packb({"type": "auth_identify", "corr_id": 1, "username": "mallory"}))
        assert msgpack.unpackb(await ws.recv())["ok"]
        refusals = {
            b"\xc1\xc1": "not a msgpack message",
            msgpack.packb({"type": "launch_rocket", "corr_id": 2}): "unknown message type 'launch_rocket'",
            msgpack.packb({"type": "launch_process", "corr_id": 3}): "missing field `inferlet`",
            msgpack.packb({"type": "launch_process", "corr_id": 4, "inferlet": "no-such-thing"}):
                "unknown inferlet 'no-such-thing'",
            msgpack.packb({"type": "launch_process", "corr_id": 5, "inferlet": "text-completion", "input": "{"}):
                "the input is not JSON",
            msgpack.packb({"type": "query", "corr_id": 6, "subject": "secrets"}): "unknown query subject",
            msgpack.packb({"type": "launch_daemon", "corr_id": 7, "inferlet": "x", "port": 1}): "not supported",
            msgpack.packb({"type": "attach_process", "corr_id": 8, "process_id": 12}): "`process_id` is int",
        }
        for frame, words in refusals.items():
            await ws.send(frame)
            reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), scaled(10)))
            assert reply.get("ok") is not True and words in (reply.get("result") or reply.get("message")), reply
        await ws.send(b"\x00" * (1024 * 1024 + 1))  # over max_frame_bytes
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), scaled(10))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    final = [e async for e in running.events()][-1]
    assert final.kind == "return"  # the well-behaved client was never disturbed
    await alice.ping()
    await alice.close()


async def test_nothing_is_answered_before_authentication(server: Server) -> None:
    async with websockets.connect(server.url) as ws:
        await ws.send(msgpack.packb({"type": "ping", "corr_id": 1}))
        await ws.send(msgpack.packb({"type": "launch_process", "corr_id": 2, "inferlet": "text-completion"}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        await ws.send(msgpack.packb({"type": "auth_identify", "corr_id": 3, "username": "carol"}))
        reply = msgpack.unpackb(await ws.recv())
        assert reply["corr_id"] == 3 and reply["ok"] and reply["result"].startswith("authenticated")
        await ws.send(msgpack.packb({"type": "ping", "corr_id": 4}))
        assert msgpack.unpackb(await ws.recv()) == {"type": "response", "corr_id": 4, "ok": True, "result": "Pong"}


async def test_reattach_after_disconnect_delivers_the_buffered_events(server: Server) -> None:
    first = await connect(server)
    process = await first.launch("text-completion", {"prompt": "Tell me", "max_tokens": 12, "stream": True})
    await first.close()  # detached mid-run; the runtime buffers its events
    second = await connect(server)
    events = [e async for e in (await second.attach(process.id)).events()]
    assert events[-1].kind == "return"
    assert "".join(str(e.value) for e in events if e.kind == "message") == events[-1].value
    await second.close()


async def test_a_client_that_disconnects_mid_run_frees_its_pages(server: Server) -> None:
    client = await connect(server)
    process = await client.launch("chat", {"max_tokens": 4})
    await chat_turn(process, "remember this")
    assert pages_used(server) > 0
    await client.close()  # nobody attaches again within detach_timeout_s
    instance = server.state.runtime.process(process.id)  # type: ignore[union-attr]
    await wait_until(lambda: instance.status == "terminated", what="the detached chat to be reaped")
    assert pages_used(server) == 0
    assert "no client attached" in str((await instance.wait()).value)


async def test_a_failing_inferlet_reports_an_error_event(server: Server) -> None:
    client = await connect(server)
    await client.install_program(b"async def main(input):\n    raise ValueError('bad prompt')\n",
                                 '[package]\nname = "fails"\nversion = "0.1.0"\n')
    with pytest.raises(ProcessFailed, match="ValueError: bad prompt"):
        await (await client.launch("fails")).result()
    await client.ping()
    await client.close()


async def test_health_and_metrics(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        health = (await http.get("/health")).json()
        metrics = (await http.get("/metrics")).text
    assert health["status"] == "ok" and health["models"] == [MODEL]
    assert f'pie_kv_pages_total{{model="{MODEL}"}} 256.0' in metrics
    assert 'pie_processes_launched_total{program="text-completion@0.1.0"}' in metrics
    assert "pie_protocol_errors_total" in metrics and "pie_connections_active" in metrics


async def _query(server: Server, subject: str) -> str:
    async with PieClient(server.url) as client:
        await client.authenticate("alice")
        return await client.query(subject)


async def test_monitor_view_shows_models_and_running_inferlets(server: Server) -> None:
    from pie.server.monitor import render

    client = await connect(server)
    process = await client.launch("chat", {})
    assert server.state is not None
    view = render(server.state.runtime, server.url)
    assert MODEL in view and "/256" in view and process.id in view and "chat@0.1.0" in view
    await process.terminate()
    await client.close()


SNAPSHOTS = b'''
from inferlet import Context, HostError, Model

async def main(input: dict) -> str:
    model = Model.load("")
    if input["op"] == "save":
        ctx = Context(model)
        ctx.append(model.tokenizer().encode("a shared system prompt " * 4))
        await ctx.flush()
        ctx.save(input["name"])
        return "saved"
    if input["op"] == "delete":
        Context.delete(model, input["name"])
        return "deleted"
    try:
        Context.open(model, input["name"]).release()
        return "opened"
    except HostError as error:
        return f"refused: {error}"
'''


async def test_one_user_cannot_open_another_users_snapshot(server: Server) -> None:
    alice, bob = await connect(server, "alice"), await connect(server, "bob")
    await alice.install_program(SNAPSHOTS, '[package]\nname = "snapshots"\nversion = "0.1.0"\n')
    await bob.install_program(SNAPSHOTS, '[package]\nname = "snapshots"\nversion = "0.1.0"\n')  # uploads are per user
    assert await (await alice.launch("snapshots", {"op": "save", "name": "prefix"})).result() == "saved"
    assert await (await alice.launch("snapshots", {"op": "open", "name": "prefix"})).result() == "opened"
    refused = await (await bob.launch("snapshots", {"op": "open", "name": "prefix"})).result()
    assert refused.startswith("refused:") and "prefix" in refused
    assert await (await alice.launch("snapshots", {"op": "delete", "name": "prefix"})).result() == "deleted"
    assert pages_used(server) == 0
    await alice.close()
    await bob.close()
