"""[runtime] keys of the server config that change how inferlets run, taken from a config as `pie serve`
loads it: `isolation = "isolated"` puts each launched inferlet in a sandbox process ([sandbox] limits),
and `max_concurrent_processes` admits that many at once while later launches wait their turn."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from pathlib import Path
from typing import Any

from server_support import running_server
from timing import scaled

from pie.client import PieClient
from pie.config import Config, parse_config
from pie.runtime.runtime import Runtime
from pie.tiny_model import TINY_MODEL_ID

PROGRAMS = {
    "whoami": textwrap.dedent("""
        import os
        from inferlet import Model

        def main(input):
            return {"pid": os.getpid(), "cwd": os.getcwd(), "tokens": Model.load("").tokenizer().encode("hello")}
    """),
    "gate": textwrap.dedent("""
        from inferlet import session

        async def main(input):
            session.send("started")
            return "gate " + await session.receive()
    """),
    "quick": "def main(input):\n    return 'quick'\n",
}


def config(tmp_path: Path, **runtime: Any) -> Config:
    """A served tiny model with PROGRAMS installed, and `runtime` as the [runtime] table."""
    programs = tmp_path / "programs"
    for name, source in PROGRAMS.items():
        (programs / name).mkdir(parents=True, exist_ok=True)
        (programs / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (programs / name / "main.py").write_text(source)
    data: dict[str, Any] = {
        "model": {"hf_repo": TINY_MODEL_ID, "device": ["cpu"], "max_num_kv_pages": 64},
        "runtime": {"inferlet_paths": [str(programs)], **runtime},
    }
    if runtime.get("isolation") == "isolated":
        # allow_weaker: the wiring, not the sandbox, is tested here (so also where bubblewrap is missing)
        data["sandbox"] = {"scratch_root": str(tmp_path / "scratch"), "cpu_time_s": 60, "allow_weaker": True}
    return parse_config(data, source=None, home=tmp_path)


async def test_an_isolated_server_runs_each_inferlet_in_a_sandbox_process(tmp_path: Path) -> None:
    async with running_server(config(tmp_path, isolation="isolated")) as server:
        client = PieClient(server.url)
        await client.connect()
        await client.authenticate("alice")
        out = json.loads(await (await client.launch("whoami")).result())
        await client.close()
    assert out["pid"] != os.getpid()  # not the server's process
    assert Path(out["cwd"]).is_relative_to(tmp_path / "scratch")  # the [sandbox] policy of the config
    assert out["tokens"]  # and the model is reachable from there


async def test_a_trusted_server_runs_inferlets_in_its_own_process(tmp_path: Path) -> None:
    async with running_server(config(tmp_path)) as server:
        client = PieClient(server.url)
        await client.connect()
        await client.authenticate("alice")
        out = json.loads(await (await client.launch("whoami")).result())
        await client.close()
    assert out["pid"] == os.getpid()


async def test_launches_past_max_concurrent_processes_wait_for_a_slot(tmp_path: Path) -> None:
    runtime = await Runtime.start(config(tmp_path, max_concurrent_processes=1))
    try:
        gate = await runtime.launch("gate", "{}", username="alice")
        first = await anext(aiter(gate.events()))
        assert (first.kind, first.value) == ("message", "started")
        queued = await runtime.launch("quick", "{}", username="alice")
        dropped = await runtime.launch("quick", "{}", username="alice")
        assert queued.status == dropped.status == "running"  # accepted, listed, waiting
        done, _ = await asyncio.wait({asyncio.ensure_future(queued.wait())}, timeout=1.0)
        assert not done, "a launch past max_concurrent_processes ran beside the running one"
        await dropped.terminate("not needed")  # leaving the queue gives no slot away
        assert (await dropped.wait()).value == "not needed" and dropped.status == "terminated"
        gate.send_message("open")
        assert (await gate.wait()).value == "gate open"
        final = await queued.wait()
        assert (final.kind, final.value) == ("return", "quick")
        final = await (await runtime.launch("quick", "{}", username="bob")).wait()
        assert final.kind == "return"  # the slot came back
    finally:
        await runtime.shutdown(0)


async def test_time_queued_for_admission_does_not_count_against_the_wall_time_limit(tmp_path: Path) -> None:
    # first (limit / 2) and second (3/4 of the limit) each fit the limit with margin; together they do not.
    limit = scaled(0.8)
    runtime = await Runtime.start(config(tmp_path, max_concurrent_processes=1, max_wall_time_s=limit))

    def sleeper(seconds: float) -> Any:
        async def body(instance: Any) -> str:
            await asyncio.sleep(seconds)
            return "slept"
        return body

    try:
        first = runtime.spawn(sleeper(limit / 2), program="first", username="alice")
        second = runtime.spawn(sleeper(limit * 3 / 4), program="second", username="alice")  # queued meanwhile
        assert (await first.wait()).kind == "return"
        final = await second.wait()  # 1.25 limits after its launch, 3/4 of one after its admission
        assert (final.kind, final.value) == ("return", "slept"), final
    finally:
        await runtime.shutdown(0)
