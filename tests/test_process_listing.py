"""`list_processes` as in Pie: live processes only, with their launch arguments and input; finished ones
stay attachable for their retention time and are listed by `query finished_processes`, their elapsed time
frozen at their end."""

from __future__ import annotations

import json
import textwrap

from server_support import running_server, wait_until

from pie.client.client import PieClient

MANIFEST = '[package]\nname = "waiter"\nversion = "0.1.0"\n'
PROGRAM = textwrap.dedent('''
    from inferlet import session

    async def main(input):
        if input.get("wait"):
            return await session.receive()
        return "done"
''')


async def test_list_shows_live_processes_with_their_input_and_finished_ones_are_frozen() -> None:
    async with running_server() as server, PieClient(server.url) as client:
        await client.authenticate("alice")
        await client.install_program(PROGRAM.encode(), MANIFEST, force=True)
        quick = await client.launch("waiter", {"wait": False, "note": "hi"})
        assert await quick.result() == "done"
        live = await client.launch("waiter", {"wait": True, "max_tokens": 8})
        listed = await client.list_processes()
        assert [p["id"] for p in listed] == [live.id]
        assert json.loads(listed[0]["input"]) == {"wait": True, "max_tokens": 8}
        assert listed[0]["arguments"] == ["--wait", "--max_tokens", "8"]

        finished = json.loads(await client.query("finished_processes"))
        assert [p["id"] for p in finished] == [quick.id] and finished[0]["arguments"] == ["--note", "hi"]
        again = json.loads(await client.query("finished_processes"))
        assert again[0]["elapsed_secs"] == finished[0]["elapsed_secs"]  # stopped at its end

        await live.send_message("bye")
        assert await live.result() == "bye"
        await wait_until(lambda: not any(p.ended_at is None for p in server.state.runtime.processes("alice")),
                         what="the waiter to end")
        assert await client.list_processes() == []
        await client.attach(quick.id)  # still attachable for its retention time
