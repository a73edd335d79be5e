"""The runtime's side of a sandbox: start the process, serve its Host calls, turn its end into a result.

    text = await run_isolated(program, input, instance.host, instance.emit, policy,
                              username=instance.username, instance_id=instance.id)

Calls are dispatched to the instance's own `InstanceHost` (only methods of the Host protocol), so a
sandbox can do exactly what a trusted inferlet of the same user could, no more. Asynchronous calls run
as tasks, so the sandbox may have several in flight. Whatever happens to the process (a crash, the
CPU or memory limit, a malformed frame) ends in `SandboxError` or `InferletError` with what happened;
cancellation (terminate, wall-time limit) kills it. The process and, under bubblewrap, its whole pid
namespace (every process the inferlet started, setsid or not) are always killed and reaped, and the
scratch folder removed, in one `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferlet._host import Host, HostError
from pie.errors import InferletError, ProtocolError, SandboxError
from pie.runtime.programs import Program
from pie.runtime.sandbox import bwrap, layers
from pie.runtime.sandbox.client import HOST_METHODS
from pie.runtime.sandbox.policy import SandboxPolicy
from pie.runtime.sandbox.wire import pack, read_frame

log = logging.getLogger(__name__)

Emit = Callable[[str, str | bytes], None]
EVENT_KINDS = frozenset({"stdout", "stderr", "message", "file"})
STDERR_TAIL_BYTES = 4096
NAMESPACE_EXIT_TIMEOUT_S = 10.0


async def run_isolated(program: Program, input: str | dict[str, Any] | None, host: Host, emit: Emit,
                       policy: SandboxPolicy, *, username: str, instance_id: str,
                       on_ready: Callable[[dict[str, Any]], None] | None = None,
                       import_paths: list[str] | None = None) -> str:
    """Run `program` in a new sandbox process; `on_ready` gets what the sandbox enforced (uid, network,
    rlimits, and `sandbox`: "bwrap" or "weaker") once it has restricted itself."""
    mode = layers.require(policy)  # SandboxError naming the missing layers unless allow_weaker
    scratch = policy.scratch_dir(username, instance_id)
    _make_scratch(scratch)
    parent, child = socket.socketpair()
    uid = bwrap.acquire_uid(policy, instance_id) if mode.bwrap else -1
    proc: asyncio.subprocess.Process | None = None
    namespace: _Namespace | None = None
    session: _Session | None = None
    stderr_tail: asyncio.Future[str] | None = None
    try:
        proc, namespace = await _spawn(policy, mode, scratch, child, uid, import_paths or [])
        child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        host_uid = uid if namespace is not None and os.geteuid() == 0 else os.getuid()
        session = _Session(host, writer, emit, _with_launch_facts(on_ready, mode, host_uid))
        stderr_tail = asyncio.ensure_future(_tail(proc.stderr))
        if namespace is not None:
            namespace.pidfd = await _namespace_pid(namespace, proc, stderr_tail, policy)
        writer.write(pack({"t": "start", "program": _program_dict(program), "input": input,
                           "policy": policy.to_dict(), "scratch": str(scratch), "username": username,
                           "os": namespace is not None, "own_uid": namespace is not None and os.geteuid() == 0,
                           "paths": import_paths or []}))
        outcome = await session.serve(reader)
        if outcome is None:
            code = _child_code(await proc.wait(), under_bwrap=namespace is not None)
            raise SandboxError(_describe_exit(code, policy, await stderr_tail))
        ok, value = outcome
        if not ok:
            raise InferletError(str(value))
        return str(value)
    finally:
        child.close()
        if session is not None:
            session.close()
        if namespace is not None:
            await namespace.kill()
        if proc is not None:
            await _reap(proc)
        if stderr_tail is not None and not stderr_tail.done():
            stderr_tail.cancel()
        parent.close()
        if uid >= 0:
            bwrap.release_uid(uid)
        if not policy.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


async def _spawn(policy: SandboxPolicy, mode: layers.Mode, scratch: Path, child: socket.socket,
                 uid: int, import_paths: list[str]) -> tuple[asyncio.subprocess.Process, _Namespace | None]:
    """The sandbox process: under bubblewrap (with the namespace to kill at the end), or, in the
    weaker mode, this Python directly (the guard then restricts it from inside)."""
    command = [sys.executable, "-B", "-m", "pie.runtime.sandbox.child", str(child.fileno())]
    streams: dict[str, Any] = {"stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.DEVNULL,
                               "stderr": asyncio.subprocess.PIPE, "start_new_session": True}
    if not mode.bwrap:
        proc = await asyncio.create_subprocess_exec(*command, pass_fds=(child.fileno(),), cwd=str(scratch),
                                                    env=_child_env(str(scratch)), **streams)
        return proc, None
    if os.geteuid() == 0:
        os.chown(scratch, uid, uid)
    launch = bwrap.plan_launch(policy, scratch, child.fileno(), uid, command, use_seccomp=mode.seccomp,
                               read_only=import_paths)
    try:
        env = _child_env(str(scratch), bwrap.package_roots())
        proc = await asyncio.create_subprocess_exec(*launch.argv, pass_fds=launch.pass_fds, cwd="/", env=env,
                                                    **streams)
        launch.spawned()
    except BaseException:
        launch.close_unstarted()
        raise
    return proc, _Namespace(launch)


class _Namespace:
    """The sandbox's pid namespace, through a pidfd of its init process: killing that init makes the
    kernel kill every process inside (setsid or not), and the pidfd turns readable only once the init
    has exited, which it does after all of them are gone."""

    def __init__(self, launch: bwrap.Launch) -> None:
        self.launch = launch
        self.pidfd: int | None = None  # once bwrap reported the init

    async def kill(self) -> None:
        self.launch.close_unstarted()
        if self.pidfd is None:
            return
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self.pidfd, on_exit)
            try:
                await asyncio.wait_for(exited, NAMESPACE_EXIT_TIMEOUT_S)
            except TimeoutError:  # a process stuck in the kernel (D state): the kill lands when it returns
                log.warning("a sandbox's processes did not exit within %g s of SIGKILL", NAMESPACE_EXIT_TIMEOUT_S)
            finally:
                loop.remove_reader(self.pidfd)
        finally:
            os.close(self.pidfd)
            self.pidfd = None


async def _namespace_pid(namespace: _Namespace, proc: asyncio.subprocess.Process,
                         stderr_tail: asyncio.Future[str], policy: SandboxPolicy) -> int:
    try:
        return await namespace.launch.started()
    except SandboxError as e:
        code = _child_code(await proc.wait(), under_bwrap=True)
        raise SandboxError(f"{e}; {_describe_exit(code, policy, await stderr_tail)}") from None


def _with_launch_facts(on_ready: Callable[[dict[str, Any]], None] | None, mode: layers.Mode,
                       host_uid: int) -> Callable[[dict[str, Any]], None] | None:
    """`on_ready` given also how the sandbox was started and its uid as the host sees it."""
    if on_ready is None:
        return None
    facts = {"sandbox": "bwrap" if mode.bwrap else "weaker", "seccomp": mode.seccomp, "host_uid": host_uid}
    return lambda message: on_ready({**message, **facts})


class _Session:
    """Serves one sandbox's frames until its `done` (or the end of the stream)."""

    def __init__(self, host: Host, writer: asyncio.StreamWriter, emit: Emit,
                 on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        self._host = host
        self._writer = writer
        self._emit = emit
        self._on_ready = on_ready
        self._calls: dict[int, asyncio.Task[None]] = {}

    async def serve(self, reader: asyncio.StreamReader) -> tuple[bool, Any] | None:
        while True:
            try:
                message = await read_frame(reader)
            except ProtocolError as e:
                raise SandboxError(f"the sandbox sent a malformed frame ({e}); it was stopped") from None
            if message is None:
                return None
            kind = message["t"]
            if kind == "done":
                return bool(message.get("ok")), message.get("v", "")
            if kind == "call":
                self._call(message)
            elif kind == "cancel":
                task = self._calls.pop(_int(message.get("id")), None)
                if task is not None:
                    task.cancel()
            elif kind == "event" and message.get("k") in EVENT_KINDS:
                self._emit(str(message["k"]), _event_value(message.get("v")))
            elif kind == "ready":
                log.debug("sandbox ready: %s", message)
                if self._on_ready is not None:
                    self._on_ready(message)
            else:
                raise SandboxError(f"the sandbox sent an unknown frame type {kind!r}; it was stopped")

    def _call(self, message: dict[str, Any]) -> None:
        call_id, method, args = _int(message.get("id")), message.get("m"), message.get("a")
        if method not in HOST_METHODS or not isinstance(args, list):
            self._reply(call_id, False, f"no host call {method!r} (or its arguments are not a list)")
        elif HOST_METHODS[method]:
            task = asyncio.ensure_future(self._call_async(call_id, method, args))
            self._calls[call_id] = task
            task.add_done_callback(lambda _t: self._calls.pop(call_id, None))
        else:
            try:
                self._reply(call_id, True, getattr(self._host, method)(*args))
            except Exception as e:
                self._reply(call_id, False, _error_text(method, e))

    async def _call_async(self, call_id: int, method: str, args: list[Any]) -> None:
        try:
            value = await getattr(self._host, method)(*args)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._reply(call_id, False, _error_text(method, e))
        else:
            self._reply(call_id, True, value)

    def _reply(self, call_id: int, ok: bool, value: Any) -> None:
        if self._writer.is_closing():
            return
        try:
            frame = pack({"t": "reply", "id": call_id, "ok": True, "v": value} if ok else
                         {"t": "reply", "id": call_id, "ok": False, "e": str(value)})
        except (TypeError, ValueError, ProtocolError) as e:  # a value msgpack cannot carry
            frame = pack({"t": "reply", "id": call_id, "ok": False, "e": f"result not transferable: {e}"})
        self._writer.write(frame)

    def close(self) -> None:
        for task in self._calls.values():
            task.cancel()
        self._calls.clear()
        self._writer.close()


def _error_text(method: str, error: Exception) -> str:
    if isinstance(error, HostError):
        return str(error)
    if isinstance(error, TypeError):
        return f"{method}: bad arguments ({error})"
    log.exception("host call %s from a sandbox failed", method)
    return f"{method} failed inside the runtime: {type(error).__name__}: {error}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1


def _event_value(value: Any) -> str | bytes:
    return value if isinstance(value, str | bytes) else str(value)


def _program_dict(program: Program) -> dict[str, Any]:
    m = program.manifest
    return {"name": m.name, "version": m.version, "entry": m.entry, "call": m.call, "files": program.files()}


def _make_scratch(scratch: Path) -> None:
    # Parents must be traversable (o+x) by the sandbox's own uid; the folder itself is chowned to it.
    for parent in reversed(scratch.parents[:2]):
        parent.mkdir(mode=0o711, exist_ok=True)
    scratch.mkdir(mode=0o700, exist_ok=True)


def _child_env(scratch: str, paths: list[str] | None = None) -> dict[str, str]:
    """The sandbox's environment; `paths`: its PYTHONPATH (default: every folder on ours)."""
    if paths is None:
        paths = [p for p in sys.path if p and os.path.isdir(p)]
    return {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8", "PYTHONPATH": os.pathsep.join(paths),
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


async def _tail(stream: asyncio.StreamReader | None) -> str:
    """The last few KiB the sandbox wrote to its real stderr (fatal errors land there)."""
    if stream is None:
        return ""
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-STDERR_TAIL_BYTES:]
    return tail.decode("utf-8", "replace").strip()


def _child_code(code: int, *, under_bwrap: bool) -> int:
    """The sandboxed process's own exit status: bwrap exits with 128 + N when its child died of signal N."""
    if under_bwrap and 128 < code < 128 + signal.NSIG:
        return -(code - 128)
    return code


def _describe_exit(code: int, policy: SandboxPolicy, stderr: str) -> str:
    if code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGXCPU:
            what = f"stopped: it used its CPU time limit of {policy.cpu_time_s} s ([sandbox] cpu_time_s)"
        elif sig == signal.SIGKILL:
            what = (f"killed (SIGKILL): most likely over its memory limit of {policy.memory_mb} MiB "
                    "([sandbox] memory_mb), or by the system")
        else:
            what = f"crashed with {sig.name}"
    else:
        what = f"exited with code {code} before returning a result"
    detail = f"\nits stderr ended with:\n{stderr}" if stderr else ""
    return f"the inferlet's sandbox process {what}{detail}"


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: children it managed to start go too
    await proc.wait()
