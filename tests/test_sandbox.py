"""Isolated mode: the same inferlets in sandbox processes; limits enforced; crashes, hogs, loops and
garbage stopped with a clear error while the server and neighbours (sandboxed or not) go on."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from inferlet_helpers import launch, pages_in_use, start_runtime

from pie.runtime import runner
from pie.runtime.api import Event
from pie.runtime.instance import Instance
from pie.runtime.runtime import Runtime
from pie.runtime.sandbox import SandboxPolicy
from pie.runtime.sandbox.guard import _python_paths, _world_readable
from pie.tiny_model import ensure_tiny_model

PROGRAMS = {
    "probe": textwrap.dedent("""
        import os
        import socket
        import subprocess

        def attempt(fn):
            try:
                fn()
                return "allowed"
            except Exception as e:
                return f"refused: {e}"

        def main(input):
            out = {"uid": os.getuid(), "cwd": os.getcwd()}
            with open("notes.txt", "w") as f:  # the scratch folder is writable
                f.write("kept for this run")
            out["scratch"] = open("notes.txt").read()
            out["read_etc"] = attempt(lambda: open("/etc/hostname").read())
            out["read_home"] = attempt(lambda: open("/root/.bashrc").read())
            out["write_tmp"] = attempt(lambda: open("/tmp/escaped.txt", "w").write("x"))
            out["socket"] = attempt(lambda: socket.create_connection(("127.0.0.1", 9), timeout=0.1))
            out["subprocess"] = attempt(lambda: subprocess.run(["id"]))
            out["kill"] = attempt(lambda: os.kill(1, 0))
            out["list_root"] = attempt(lambda: os.listdir("/"))
            return out
    """),
    "reader": textwrap.dedent("""
        def main(input):
            try:
                return "read " + str(len(open("/etc/hostname").read()) >= 0)
            except PermissionError as e:
                return f"refused: {e}"
    """),
    "hog": textwrap.dedent("""
        def main(input):
            blocks = []
            while True:
                blocks.append(bytearray(64 * 1024 * 1024))
    """),
    "cpu-loop": "def main(input):\n    while True:\n        pass\n",
    "crash": "import os\n\ndef main(input):\n    os.abort()\n",
    "garbage-frames": textwrap.dedent("""
        import os

        def main(input):
            for fd in range(3, 64):  # find the runtime's socket and write nonsense on it
                try:
                    os.write(fd, b"\\xff\\xff\\xff\\xf0 not a frame")
                except OSError:
                    pass
            import time
            time.sleep(5)
    """),
    "sleeper": textwrap.dedent("""
        import asyncio
        import os
        from inferlet import session

        async def main(input):
            session.send(str(os.getpid()))
            session.send(os.getcwd())
            while True:
                await asyncio.sleep(0.05)
    """),
}
# allow_weaker: these tests are about the API and the limits, so they run also where bubblewrap is missing
POLICY = SandboxPolicy(allow_weaker=True, cpu_time_s=3, memory_mb=1536)
WELL_BEHAVED = ("text-completion", {"prompt": "Count to three.", "max_tokens": 10})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path, tmp_path: Path) -> Runtime:
    programs = tmp_path / "programs"
    for name, source in PROGRAMS.items():
        (programs / name).mkdir(parents=True)
        (programs / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (programs / name / "main.py").write_text(source)
    runtime_ = await start_runtime(tiny, paths=(programs,))
    yield runtime_
    await runtime_.shutdown(0)


def isolated(rt: Runtime, program: str, inputs: dict[str, Any], policy: SandboxPolicy,
             ready: list[dict[str, Any]] | None = None) -> Instance:
    resolved = rt.registry.resolve(program)

    async def body(instance: Instance) -> str:
        from pie.runtime.sandbox.server import run_isolated

        assert instance.host is not None
        return await run_isolated(resolved, json.dumps(inputs), instance.host, instance.emit, policy,
                                  username=instance.username, instance_id=instance.id,
                                  on_ready=ready.append if ready is not None else None)

    return rt.spawn(body, program=resolved.spec, username="alice")


def processes_of_uid(uid: int) -> list[int]:
    """Pids of every process on this host whose real uid is `uid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:  # it ended while we looked
            continue
        if any(line.split()[1:2] == [str(uid)] for line in status.splitlines() if line.startswith("Uid:")):
            pids.append(int(entry.name))
    return pids


async def drain(process: Instance) -> tuple[Event, list[Event]]:
    events = [e async for e in process.events()]
    return events[-1], events[:-1]


async def test_sandboxed_inferlet_matches_trusted_mode(rt: Runtime, tmp_path: Path) -> None:
    policy = SandboxPolicy(allow_weaker=True, scratch_root=tmp_path / "scratch")
    trusted, _ = await launch(rt, *WELL_BEHAVED)
    final, events = await drain(isolated(rt, "text-completion", {**WELL_BEHAVED[1], "stream": True}, policy))
    assert final.kind == "return", final.value
    assert final.value == trusted.value
    assert "".join(e.value for e in events if e.kind == "message") == trusted.value
    sampled = {"prompt": "x", "max_tokens": 6, "temperature": 1.0, "seed": 11}
    in_sandbox, _ = await drain(isolated(rt, "constrained-json", {**sampled, "schema": {"enum": ["a", "b"]}},
                                         policy))
    in_process, _ = await launch(rt, "constrained-json", {**sampled, "schema": {"enum": ["a", "b"]}})
    assert in_sandbox.value == in_process.value  # grammars, seeds and all: the same API
    assert pages_in_use(rt) == 0
    assert not any((tmp_path / "scratch").rglob("*.txt"))


async def test_the_sandbox_confines_files_network_and_processes(rt: Runtime, tmp_path: Path) -> None:
    policy = SandboxPolicy(allow_weaker=True, scratch_root=tmp_path / "scratch")
    ready: list[dict[str, Any]] = []
    final, _ = await drain(isolated(rt, "probe", {}, policy, ready))
    assert final.kind == "return", final.value
    out = json.loads(final.value)
    assert out["scratch"] == "kept for this run" and out["cwd"].startswith(str(tmp_path / "scratch"))
    for key in ("read_etc", "read_home", "write_tmp", "socket", "subprocess", "kill", "list_root"):
        assert out[key].startswith("refused: sandbox:"), (key, out[key])
    assert not Path("/tmp/escaped.txt").exists()
    assert not any((tmp_path / "scratch").rglob("notes.txt"))  # the scratch folder went with the instance
    (info,) = ready
    assert info["rlimits"]["RLIMIT_CORE"] == 0 and info["rlimits"]["RLIMIT_AS"] == policy.memory_mb * 2**20
    if info["sandbox"] == "bwrap":  # the OS sandbox (tests/test_sandbox_escape.py tries to get out of it)
        assert info["network"] == "namespace"
        assert policy.uid_base <= out["uid"] == info["uid"] < policy.uid_base + policy.uid_span
        if os.geteuid() == 0:
            assert info["host_uid"] == out["uid"]
            assert info["rlimits"]["RLIMIT_NPROC"] == policy.max_processes
    elif os.geteuid() == 0:
        assert info["network"] == "namespace"
        switched = all(_world_readable(p) for p in _python_paths())
        expected_uid = policy.uid_for("alice") if switched else 0
        assert out["uid"] == info["uid"] == expected_uid, info["uid_note"]
    else:
        assert info["network"] == "audit-hook" and out["uid"] == os.getuid()


async def test_crashes_hogs_loops_and_garbage_are_stopped_beside_neighbours(rt: Runtime, tmp_path: Path) -> None:
    policy = SandboxPolicy(allow_weaker=True, cpu_time_s=3, memory_mb=1536, scratch_root=tmp_path / "scratch")
    # The hog gets CPU to spare (filling memory costs CPU time too), so its memory limit is what stops it.
    hog_policy = SandboxPolicy(allow_weaker=True, cpu_time_s=120, memory_mb=768, scratch_root=tmp_path / "scratch")
    bad = {name: isolated(rt, name, {}, policy) for name in ("cpu-loop", "crash", "garbage-frames")}
    bad["hog"] = isolated(rt, "hog", {}, hog_policy)
    sandboxed_neighbour = isolated(rt, *WELL_BEHAVED, policy)
    trusted_neighbour, _ = await launch(rt, *WELL_BEHAVED)
    finals = {name: (await drain(p))[0] for name, p in bad.items()}
    assert {f.kind for f in finals.values()} == {"error"}
    assert "MemoryError" in finals["hog"].value or "memory limit" in finals["hog"].value
    assert "CPU time limit of 3 s" in finals["cpu-loop"].value
    assert "crashed with SIGABRT" in finals["crash"].value
    assert "malformed frame" in finals["garbage-frames"].value
    neighbour, _ = await drain(sandboxed_neighbour)
    assert neighbour.kind == "return" and neighbour.value == trusted_neighbour.value
    assert pages_in_use(rt) == 0


async def test_terminate_kills_the_sandbox_process(rt: Runtime, tmp_path: Path) -> None:
    policy = SandboxPolicy(allow_weaker=True, scratch_root=tmp_path / "scratch")
    ready: list[dict[str, Any]] = []
    process = isolated(rt, "sleeper", {}, policy, ready)
    events = process.events()
    pid = int((await events.__anext__()).value)
    scratch = Path((await events.__anext__()).value)
    assert scratch.is_dir()
    await process.terminate("enough")
    assert (await process.wait()).value == "enough"
    (info,) = ready
    if info["sandbox"] == "weaker":
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    elif os.geteuid() == 0:  # the pid is one of its own namespace: look for its uid instead
        assert not processes_of_uid(info["host_uid"])
    assert not scratch.exists()


async def test_runner_run_picks_the_mode(rt: Runtime, tmp_path: Path) -> None:
    program = rt.registry.resolve("reader")

    async def body(instance: Instance) -> str:
        assert instance.host is not None
        sandboxed = await runner.run(program, "{}", instance.host, instance.emit,
                                     sandbox=SandboxPolicy(allow_weaker=True, scratch_root=tmp_path / "s"))
        trusted = await runner.run(program, "{}", instance.host, instance.emit)
        return json.dumps([sandboxed, trusted])

    final = await rt.spawn(body, program="reader", username="alice").wait()
    sandboxed, trusted = json.loads(final.value)
    assert sandboxed.startswith("refused: sandbox:") and trusted == "read True"
