"""The escape suite: inferlets that try to get out of isolated mode, through the real launch path.

Every program first neutralises the audit-hook guard (its tables are module globals and its closure
cells are writable, as an attacker would find), so what stops it is the operating system's sandbox:
bubblewrap's namespaces, the sandbox's own uid, seccomp and the rlimits. Each attempt must be refused
or have no effect outside the sandbox, and no process of the instance may outlive it.

The suite skips (saying why) only where this host lacks a layer; `.ci/run` installs bubblewrap.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig
from pie.runtime.sandbox import SandboxPolicy
from pie.runtime.sandbox.layers import probe
from pie.tiny_model import ensure_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

LAYERS = {layer.name: layer for layer in probe()}
_NEEDED = ("bubblewrap", "mount namespace", "pid namespace", "network namespace", "no_new_privs", "seccomp")
_missing = [f"{n} ({LAYERS[n].detail})" for n in _NEEDED if not LAYERS[n].present]
if _missing:
    pytest.skip(f"this host lacks sandbox layers: {'; '.join(_missing)}", allow_module_level=True)
OWN_UID = LAYERS["user namespace, own uid"].present and LAYERS["resource limits"].present
needs_own_uid = pytest.mark.skipif(not OWN_UID, reason="the sandbox has no uid of its own here (server not "
                                   f"root): {LAYERS['user namespace, own uid'].detail}")
MAX_PROCESSES = 24
SECRET = "s3cr3t-" + uuid.uuid4().hex

PRELUDE = textwrap.dedent("""
    import ctypes, ctypes.util, errno, gc, json, os, resource, signal, socket, subprocess, sys, time

    def disable_guard():
        # The audit hook cannot be removed, but it reads its tables from module globals and its roots
        # from closure cells, both writable from here.
        guard = sys.modules["pie.runtime.sandbox.guard"]
        for name in ("_BLOCKED_EVENTS", "_NETWORK_EVENTS", "_WRITE_PATH_EVENTS", "_READ_PATH_EVENTS"):
            setattr(guard, name, frozenset())
        for fn in gc.get_objects():
            if getattr(fn, "__qualname__", "") == "_make_hook.<locals>.hook":
                for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                    if name == "home":
                        cell.cell_contents = "/"
                    elif name == "allow_network":
                        cell.cell_contents = True
        open("/proc/1/status").read()  # outside the guard's roots: proof that it is out of the way
        subprocess.run(["true"], check=True)

    def attempt(fn):
        try:
            return "ok: " + repr(fn())[:200]
        except BaseException as e:
            return f"refused: {type(e).__name__}: {e}"

    def c_call(name, *args):  # a libc function through ctypes (after disable_guard: it blocks ctypes)
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
        result = fn(*args)
        return "refused: " + errno.errorcode.get(ctypes.get_errno(), "?") if result == -1 else f"ok: {result}"
""")

PROGRAMS = {
    "read-secrets": """
        def main(input):
            disable_guard()
            out = {path: attempt(lambda: open(path).read()) for path in input["paths"]}
            out["root"] = sorted(os.listdir("/"))
            return out
    """,
    "keeper": """
        import asyncio
        from inferlet import session

        async def main(input):
            with open("secret.txt", "w") as f:
                f.write(input["secret"])
            session.send(os.path.abspath("secret.txt"))
            while True:
                await asyncio.sleep(0.05)
    """,
    "write-outside": """
        def write(path):
            with open(path, "w") as f:
                f.write("escaped")

        def main(input):
            disable_guard()
            return {path: attempt(lambda: write(path)) for path in input["paths"]}
    """,
    "exec-id": """
        def main(input):
            disable_guard()
            run = subprocess.run(["id", "-u"], capture_output=True, text=True, check=True)
            return {"id": int(run.stdout), "uid": os.getuid(), "uid_map": open("/proc/self/uid_map").read()}
    """,
    "ctypes": """
        CLONE_NEWUSER, CLONE_NEWNS, PTRACE_ATTACH = 0x10000000, 0x00020000, 16
        SYS_add_key = {"x86_64": 248, "aarch64": 217}[os.uname().machine]
        # (x86_64, aarch64) numbers of other calls the filter denies, made with harmless arguments
        DENIED = {"bpf": (321, 280), "perf_event_open": (298, 241), "keyctl": (250, 219), "setns": (308, 268),
                  "io_uring_setup": (425, 425), "userfaultfd": (323, 282), "clone3": (435, 435)}

        def main(input):
            disable_guard()
            os.mkdir("mnt")
            return {
                "setuid0": c_call("setuid", 0),
                "setgid0": c_call("setgid", 0),
                "unshare": c_call("unshare", CLONE_NEWUSER | CLONE_NEWNS),
                "mount": c_call("mount", b"none", b"mnt", b"tmpfs", 0, None),
                "chroot": c_call("chroot", b"mnt"),
                "add_key": c_call("syscall", SYS_add_key, b"user", b"k", b"v", 1, -3),
                "ptrace_init": c_call("ptrace", PTRACE_ATTACH, 1, None, None),
                "uid": os.getuid(),
                **{name: c_call("syscall", nr[os.uname().machine == "aarch64"], 0, 0, 0, 0) for name, nr in DENIED.items()},
            }
    """,
    "signal-server": """
        PTRACE_ATTACH = 16

        def main(input):
            disable_guard()
            pid = input["server_pid"]
            cmdline = attempt(lambda: open(f"/proc/{pid}/cmdline", "rb").read())
            return {"kill": attempt(lambda: os.kill(pid, signal.SIGTERM)), "cmdline": cmdline,
                    "ptrace": c_call("ptrace", PTRACE_ATTACH, pid, None, None), "pids": os.listdir("/proc")}
    """,
    "setsid-child": """
        def main(input):
            disable_guard()
            marker = input["marker"]
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker], start_new_session=True)
            if os.fork() == 0:  # and a double-forked daemon, in its own session
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", marker])
                os._exit(0)
            return {"uid": os.getuid()}
    """,
    "sockets": """
        def tcp(host, port):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect((host, port))
            return "connected"

        def main(input):
            disable_guard()
            return {
                "tcp_server": attempt(lambda: tcp("127.0.0.1", input["port"])),
                "tcp_out": attempt(lambda: tcp("192.0.2.1", 80)),
                "udp_out": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.0.2.1", 53))),
                "raw": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                "packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
                "interfaces": open("/proc/net/dev").read().count(":"),
            }
    """,
    "rlimit": """
        def main(input):
            disable_guard()
            out = {}
            for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE"):
                which = getattr(resource, name)
                soft, hard = resource.getrlimit(which)
                out[name] = {
                    "before": [soft, hard],
                    "raise": attempt(lambda: resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))),
                    "raise_c": c_call("prlimit", 0, which, (ctypes.c_ulong * 2)(2**63, 2**63), None),
                    "after": list(resource.getrlimit(which)),
                }
            return out
    """,
    "fork-bomb": """
        def main(input):
            disable_guard()
            children, error = 0, ""
            while children < 10_000:
                try:
                    pid = os.fork()
                except OSError as e:
                    error = f"{errno.errorcode.get(e.errno)}: {e.strerror}"
                    break
                if pid == 0:
                    time.sleep(600)
                    os._exit(0)
                children += 1
            return {"children": children, "error": error, "uid": os.getuid()}
    """,
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's PIE_HOME, with a keystore holding a secret."""
    path = tmp_path_factory.mktemp("pie-home")
    (path / "auth").mkdir()
    (path / "auth" / "keystore.toml").write_text(f'secret = "{SECRET}"\n')
    return path


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rt(home: Path, scratch_root: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    model = ensure_tiny_model(home)
    programs = tmp_path_factory.mktemp("programs")
    for name, body in PROGRAMS.items():
        (programs / name).mkdir()
        (programs / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (programs / name / "main.py").write_text(PRELUDE + textwrap.dedent(body))
    policy = SandboxPolicy(cpu_time_s=30, memory_mb=2048, max_processes=MAX_PROCESSES, scratch_root=scratch_root,
                           allow_weaker=not OWN_UID)
    engine = EngineConfig(model=str(model), device="cpu", max_num_kv_pages=64)
    runtime = await Runtime.start(RuntimeConfig((ModelSpec("tiny", engine),), inferlet_paths=(programs,),
                                                pie_home=home, sandbox=policy))
    yield runtime
    await runtime.shutdown(0)


@pytest.fixture(autouse=True)
def nothing_survives(rt: Runtime) -> Iterator[None]:
    """After every test: no process runs as a sandbox uid (root mode: each sandbox's uid is its own)."""
    yield
    if OWN_UID:
        assert rt.sandbox is not None
        low, high = rt.sandbox.uid_base, rt.sandbox.uid_base + rt.sandbox.uid_span
        assert not [pid for pid, uid in process_uids().items() if low <= uid < high]


def process_uids() -> dict[int, int]:
    """Every process on this host and its real uid."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:  # it ended while we looked
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                out[int(entry.name)] = int(line.split()[1])
    return out


async def run(rt: Runtime, program: str, inputs: dict[str, Any] | None = None) -> Any:
    """Launch `program` isolated; its JSON result (an error event fails the test)."""
    process = await rt.launch(program, json.dumps(inputs or {}), username="mallory")
    final = await process.wait()
    assert final.kind == "return", final.value
    return json.loads(final.value)


def processes_with(*, uid: int | None = None, marker: str | None = None) -> list[int]:
    """Pids on this host whose real uid is `uid`, or whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        uids = [line.split()[1] for line in status.splitlines() if line.startswith("Uid:")]
        if (uid is not None and uids == [str(uid)]) or (marker is not None and marker in cmdline):
            pids.append(int(entry.name))
    return pids


def assert_refused(results: dict[str, str], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert str(results[key]).startswith("refused"), (key, results[key])


async def test_reading_secrets_finds_nothing(rt: Runtime, home: Path) -> None:
    keeper = await rt.launch("keeper", json.dumps({"secret": SECRET}), username="alice")
    events = keeper.events()
    other_scratch = (await events.__anext__()).value
    assert Path(other_scratch).read_text() == SECRET  # it is there, on the host
    keystore = str(home / "auth" / "keystore.toml")
    out = await run(rt, "read-secrets", {"paths": ["/etc/shadow", keystore, other_scratch, "/etc/passwd"]})
    await keeper.terminate("done")
    assert_refused(out, ("/etc/shadow", keystore, other_scratch, "/etc/passwd"))
    assert SECRET not in json.dumps(out)
    for host_dir in ("home", "var", "opt", "srv", "boot"):  # none of the host's other folders is there
        assert host_dir not in out["root"], out["root"]


async def test_writes_outside_scratch_have_no_effect(rt: Runtime, home: Path) -> None:
    import pie

    marker = uuid.uuid4().hex
    package_file = Path(pie.__file__).parent / f"escaped-{marker}.py"
    targets = [str(package_file), str(home / f"escaped-{marker}"), f"/tmp/escaped-{marker}", f"/escaped-{marker}",
               f"/usr/escaped-{marker}"]
    out = await run(rt, "write-outside", {"paths": targets})
    assert_refused(out, (str(package_file), f"/usr/escaped-{marker}", f"/escaped-{marker}"))
    for target in targets:  # /tmp is the sandbox's own tmpfs: the write may succeed there, never here
        assert not Path(target).exists(), target


@needs_own_uid
async def test_a_subprocess_runs_as_the_sandbox_uid(rt: Runtime) -> None:
    out = await run(rt, "exec-id")
    assert out["id"] == out["uid"]
    assert out["uid"] not in (0, os.getuid())
    assert rt.sandbox is not None and rt.sandbox.uid_base <= out["uid"] < rt.sandbox.uid_base + rt.sandbox.uid_span
    assert not processes_with(uid=out["uid"])


async def test_ctypes_gets_no_privilege(rt: Runtime) -> None:
    out = await run(rt, "ctypes")
    assert_refused(out, ("setuid0", "setgid0", "unshare", "mount", "chroot", "add_key", "ptrace_init"))
    assert "EPERM" in out["mount"] and "EPERM" in out["add_key"] and "EPERM" in out["ptrace_init"]
    for name in ("bpf", "perf_event_open", "keyctl", "setns", "io_uring_setup", "userfaultfd"):
        assert out[name] == "refused: EPERM", (name, out[name])  # the seccomp filter, whatever the arguments
    assert out["clone3"] == "refused: ENOSYS"  # so that libc falls back to clone, whose flags are checked


async def test_the_server_cannot_be_signalled_or_traced(rt: Runtime) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: received.append(sig))
    try:
        out = await run(rt, "signal-server", {"server_pid": os.getpid()})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not received
    assert "pytest" not in out["cmdline"]  # that pid, if it exists there, is one of the sandbox's own
    assert out["kill"].startswith("refused") or "pytest" not in out["cmdline"]
    assert out["ptrace"].startswith("refused")
    assert len([p for p in out["pids"] if p.isdigit()]) < 10  # its /proc lists its own namespace only


async def test_no_setsid_child_outlives_the_instance(rt: Runtime) -> None:
    marker = f"pie-escape-{uuid.uuid4().hex}"
    out = await run(rt, "setsid-child", {"marker": marker})
    assert not processes_with(marker=marker)
    if OWN_UID:
        assert not processes_with(uid=out["uid"])


async def test_no_network_from_the_sandbox(rt: Runtime) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        out = await run(rt, "sockets", {"port": listener.getsockname()[1]})
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert_refused(out, ("tcp_server", "tcp_out", "udp_out", "raw", "packet"))
    assert "Operation not permitted" in out["packet"] and "Operation not permitted" in out["raw"]
    assert out["interfaces"] == 1  # the loopback device only


async def test_rlimits_cannot_be_raised(rt: Runtime) -> None:
    out = await run(rt, "rlimit")
    assert rt.sandbox is not None
    expected_hard = {"RLIMIT_AS": rt.sandbox.memory_mb * 2**20, "RLIMIT_CPU": rt.sandbox.cpu_time_s + 1,
                     "RLIMIT_NOFILE": rt.sandbox.max_open_files, "RLIMIT_FSIZE": rt.sandbox.max_file_mb * 2**20}
    if OWN_UID:
        expected_hard["RLIMIT_NPROC"] = MAX_PROCESSES
    for name, hard in expected_hard.items():
        limit = out[name]
        assert limit["before"][1] == hard and limit["after"] == limit["before"], (name, limit)
        assert limit["raise"].startswith("refused") and limit["raise_c"].startswith("refused"), (name, limit)


@needs_own_uid
async def test_a_fork_bomb_is_bounded_and_the_next_inferlet_runs(rt: Runtime) -> None:
    out = await run(rt, "fork-bomb")
    assert 0 < out["children"] < MAX_PROCESSES and out["error"].startswith("EAGAIN"), out
    assert not processes_with(uid=out["uid"])
    after = await rt.launch("text-completion", json.dumps({"prompt": "One, two,", "max_tokens": 4}), username="bob")
    final = await after.wait()
    assert final.kind == "return", final.value
