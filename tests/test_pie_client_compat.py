"""The `pie-client` package (0.5.x, unmodified) against our server and the real runtime."""

from __future__ import annotations

import asyncio
import json

import pie_client
import pytest
import pytest_asyncio
from pie_client import Event, PieClient, inferlet
from server_support import MODEL, pages_used, running_server
from timing import scaled

from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")


@inferlet
async def shout(prompt: str, times: int = 2) -> dict:
    """Upper-case the prompt, and report the tokenizer's view of it."""
    from inferlet import Model, session

    model = Model.load("")
    session.send(f"tokens: {len(model.tokenizer().encode(prompt))}")
    return {"text": (prompt.upper() + " ") * times, "model": model.name}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server() as server:
        yield server


def base_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}"  # pie-client appends /v1/ws itself


async def drain(process: pie_client.Process) -> list[tuple[Event, object]]:
    events = []
    while True:
        event, value = await asyncio.wait_for(process.recv(), scaled(30))
        events.append((event, value))
        if event in (Event.Return, Event.Error):
            return events


async def test_connect_query_and_launch_by_name_streams_to_return(server: Server) -> None:
    async with PieClient(base_url(server)) as client:
        await client.authenticate("alice")
        await client.ping()
        ok, status = await client.query("model_status", "")
        assert ok and json.loads(status)[MODEL]["kv_pages_total"] == 256
        assert await client.check_program("text-completion@0.1.0")
        assert not await client.check_program("text-completion@9.9.9")
        process = await client.launch_process("text-completion", {"prompt": "Hi", "max_tokens": 6, "stream": True})
        events = await drain(process)
    assert events[-1][0] is Event.Return
    assert "".join(str(v) for e, v in events if e is Event.Message) == events[-1][1]


async def test_attach_from_a_second_connection_list_signal_terminate(server: Server) -> None:
    async with PieClient(base_url(server)) as first, PieClient(base_url(server)) as second:
        await first.authenticate("alice")
        await second.authenticate("alice")
        process = await first.launch_process("chat", {"max_tokens": 4})
        listed = await second.list_processes()
        row = next(p for p in listed if p["id"] == process.process_id)
        assert row["program"] == "chat@0.1.0" and row["username"] == "alice" and row["elapsed_secs"] >= 0
        attached = await second.attach_process(process.process_id)
        await attached.signal("hello")
        event, reply = await asyncio.wait_for(attached.recv(), scaled(30))
        assert event is Event.Message and isinstance(reply, str)
        await attached.terminate()
        event, why = await asyncio.wait_for(attached.recv(), scaled(30))
        assert event is Event.Error and "terminated" in why
    assert pages_used(server) == 0


async def test_transfer_file_and_receive_a_file(server: Server) -> None:
    source = (b"from inferlet import session\n\nasync def main(input):\n"
              b"    data = await session.receive_file()\n    session.send_file(data + b'!')\n    return 'ok'\n")
    async with PieClient(base_url(server)) as client:
        await client.authenticate("alice")
        await client.install_program_bytes(source, '[package]\nname = "bang"\nversion = "0.2.0"\n')
        process = await client.launch_process("bang@0.2.0")
        await process.transfer_file(b"x" * 300_000)  # two chunks
        events = await drain(process)
    assert events[0][0] is Event.File and bytes(events[0][1]) == b"x" * 300_000 + b"!"
    assert events[-1] == (Event.Return, "ok")


async def test_an_inferlet_decorated_function_is_uploaded_as_source_and_runs(server: Server) -> None:
    async with PieClient(base_url(server)) as client:
        await client.authenticate("alice")
        process = await client.run(shout, prompt="pie", times=3)
        assert await client.check_program(shout.program)  # installed under its content-hashed version
        result = await process.result()
    assert result == {"text": "PIE PIE PIE ", "model": MODEL}
    assert process.output and process.output[0].startswith("tokens: ")


async def test_errors_reach_the_client_as_exceptions(server: Server) -> None:
    async with PieClient(base_url(server)) as client:
        await client.authenticate("alice")
        with pytest.raises(Exception, match="unknown inferlet 'nope'"):
            await client.launch_process("nope")
        with pytest.raises(Exception, match="no process"):
            await client.attach_process("00000000-0000-0000-0000-000000000000")
        await client.ping()  # the connection is still good
