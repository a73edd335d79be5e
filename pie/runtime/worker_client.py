"""The engine in worker processes: one per tensor-parallel rank, rank 0 spoken to over a socketpair.

    engine = await WorkerEngine.start(replace(config, tensor_parallel_size=2), ["cuda:0", "cuda:1"], "qwen")
    result = await engine.forward(batch)
    await engine.close()

`start` spawns `python -m pie.engine.worker` once per local device with the
torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and waits until every rank has loaded its slice of the model.
Ranks beyond the local devices run on other hosts and join the same
rendezvous (docs/parallelism.md). The rendezvous socket is bound here and
handed to rank 0 (`--store-fd`), so port 0 picks a free port that no other
process can take before rank 0 serves torch.distributed's store on it.
Messages are `pie.engine.wire` msgpack, never pickle; this module imports no
torch.

Failures: a pie error the engine raises for a batch (BatchError, ...) comes
back as the same exception type and the workers keep serving. A worker that
dies or reports a fatal error ends the group: that call and every later one
raise `EngineWorkerError` with the exit code and the tail of the ranks' logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from pie.engine import wire
from pie.engine.batch import BatchResult, ForwardBatch
from pie.engine.config import EngineConfig
from pie.engine.info import EngineInfo
from pie.errors import ConfigError, EngineWorkerError

T = TypeVar("T")
POLL_S = 0.1  # how often a waiting call checks that the local ranks are alive
LOG_TAIL_CHARS = 3000
LISTEN_BACKLOG = 128  # connections of ranks that arrive before rank 0 serves the store wait here


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: rank 0 hosts torch.distributed's TCP store at addr:port."""

    addr: str = "127.0.0.1"
    port: int = 0  # 0 = a free port on this host (ranks on other hosts learn it from `on_listening`)


class WorkerEngine:
    """Implements `pie.runtime.api.EngineClient`. Calls are serialised on one thread, one request in flight."""

    def __init__(self, group: _WorkerGroup, executor: ThreadPoolExecutor, info: EngineInfo) -> None:
        self._group: _WorkerGroup | None = group
        self._executor = executor
        self._info = info

    @classmethod
    async def start(cls, config: EngineConfig, devices: list[str], name: str = "", *,
                    rendezvous: Rendezvous = Rendezvous(), ready_timeout_s: float = 600.0,
                    python: str = sys.executable,
                    on_listening: Callable[[str, int], None] | None = None) -> WorkerEngine:
        """Spawn one worker per device (ranks 0 .. len(devices) - 1) and wait until all
        `config.tensor_parallel_size` ranks have loaded the model.

        The rendezvous port is bound before any rank starts; `on_listening(addr, port)` is then
        called with the bound port (what ranks on other hosts need when `rendezvous.port` is 0).

        Raises ConfigError (also: the rendezvous port is taken), what loading raises on the workers
        (CheckpointError, ...) or EngineWorkerError (a worker died, or not ready within `ready_timeout_s`).
        """
        _check_devices(config, devices, rendezvous, learns_port=on_listening is not None)
        listener = _listen(rendezvous)
        try:
            if on_listening is not None:
                on_listening(rendezvous.addr, int(listener.getsockname()[1]))
        except BaseException:
            listener.close()
            raise
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pie-workers-{name or config.model}")
        loop = asyncio.get_running_loop()
        group = _WorkerGroup(python, name or config.model)
        try:
            info = await loop.run_in_executor(executor, group.start, config, devices, rendezvous.addr, listener,
                                              ready_timeout_s)
        except BaseException:
            listener.close()  # group.start closes it once handed on; not if it never ran
            await loop.run_in_executor(executor, group.stop)
            executor.shutdown(wait=False)
            raise
        return cls(group, executor, info)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def pids(self) -> list[int]:
        """The local worker processes (rank order)."""
        return [] if self._group is None else [p.pid for p in self._group.processes]

    async def forward(self, batch: ForwardBatch) -> BatchResult:
        result = await self._call(self._active().request, ["forward", batch])
        assert isinstance(result, BatchResult), type(result)
        return result

    async def copy_pages(self, src: list[int], dst: list[int]) -> None:
        await self._call(self._active().request, ["copy_pages", list(src), list(dst)])

    async def close(self) -> None:
        """Ask the ranks to exit (after the call in flight), then kill any that do not."""
        if self._group is None:
            return
        group, self._group = self._group, None
        await self._call(group.stop)
        self._executor.shutdown(wait=True)

    def _active(self) -> _WorkerGroup:
        if self._group is None:
            raise EngineWorkerError("the engine workers are closed")
        return self._group

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _check_devices(config: EngineConfig, devices: list[str], rendezvous: Rendezvous, *, learns_port: bool) -> None:
    tp = config.tensor_parallel_size
    if not 1 <= len(devices) <= tp:
        raise ConfigError(f"tensor_parallel_size = {tp} with {len(devices)} local device(s) {devices}: list 1 to "
                          f"{tp} devices (the remaining ranks join from other hosts)")
    if len(devices) < tp and rendezvous.port == 0 and not learns_port:
        raise ConfigError(f"tensor_parallel_size = {tp} with {len(devices)} local device(s): ranks {len(devices)}.."
                          f"{tp - 1} join from other hosts, so the rendezvous needs a fixed address and port they "
                          f"can reach; pass rendezvous=Rendezvous(addr, port), or port 0 with on_listening to "
                          f"learn the port chosen")
    gpus = [d for d in devices if d not in ("cpu", "mps")]
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"devices {devices} name a GPU twice; each rank needs its own")


class _WorkerGroup:
    """The local worker processes and rank 0's socket; blocking, used from one thread only."""

    def __init__(self, python: str, name: str) -> None:
        self.python, self.name = python, name
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.conn: Connection | None = None
        self.failure: str | None = None  # why the group stopped serving, once it has
        self._log_dir = Path(tempfile.mkdtemp(prefix="pie-workers-"))

    def start(self, config: EngineConfig, devices: list[str], addr: str, listener: socket.socket,
              timeout_s: float) -> EngineInfo:
        """Spawn the local ranks; rank 0 gets the server's socket and the bound rendezvous `listener`
        (closed here once handed on)."""
        port = int(listener.getsockname()[1])
        ours, theirs = socket.socketpair()
        try:
            for rank, device in enumerate(devices):
                env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(config.tensor_parallel_size),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(len(devices)),
                       "MASTER_ADDR": addr, "MASTER_PORT": str(port), "PIE_DEVICE": device}
                fds = (theirs.fileno(), listener.fileno()) if rank == 0 else None
                self.processes.append(self._spawn(rank, env, fds))
        finally:
            theirs.close()
            listener.close()
        self.conn = Connection(ours.detach())
        reply = self.request(["start", config], deadline=time.monotonic() + timeout_s)
        assert isinstance(reply, EngineInfo), type(reply)
        return reply

    def _spawn(self, rank: int, env: dict[str, str], fds: tuple[int, int] | None) -> subprocess.Popen[bytes]:
        """Rank 0 gets `fds` = (the server's socket, the rendezvous listener)."""
        log = self._log_dir / f"rank{rank}.log"
        self.logs.append(log)
        args = [self.python, "-m", "pie.engine.worker"]
        if fds is not None:
            args += ["--server-fd", str(fds[0]), "--store-fd", str(fds[1])]
        with log.open("wb") as out:
            return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    pass_fds=fds or (), start_new_session=True)

    def request(self, message: list[Any], deadline: float | None = None) -> Any:
        """Send one message to rank 0 and wait for its reply, watching the local ranks meanwhile."""
        if self.failure is not None:
            raise EngineWorkerError(f"the engine workers of {self.name} have stopped: {self.failure}")
        assert self.conn is not None
        try:
            self.conn.send_bytes(wire.encode(message))
            op, *args = wire.decode(self._wait_reply(deadline))
        except (OSError, EOFError) as e:
            raise self._fail(f"the connection to rank 0 broke ({e})") from None
        if op in ("ok", "ready"):
            return args[0]
        if op == "error":  # the workers raised a pie error before any device work, and keep serving
            raise wire.error_from_wire(*args)
        raise self._fail(str(args[0]) if op == "fatal" else f"unexpected reply {op!r} from rank 0")

    def _wait_reply(self, deadline: float | None) -> bytes:
        assert self.conn is not None
        while not self.conn.poll(POLL_S):
            for rank, proc in enumerate(self.processes):
                if proc.poll() is not None:
                    if self.conn.poll(0):  # its last words (an "error" or "fatal") are already here
                        return self.conn.recv_bytes()
                    raise self._fail(f"rank {rank} (pid {proc.pid}) exited with code {proc.returncode}")
            if deadline is not None and time.monotonic() > deadline:
                raise self._fail("the workers were not ready in time (raise ready_timeout_s for large models)")
        return self.conn.recv_bytes()

    def _fail(self, reason: str) -> EngineWorkerError:
        """Stop the group for good; the error carries the reason and the ranks' log tails."""
        self.failure = reason
        self._kill()
        tails = "\n".join(f"--- rank {r} log ({log}) ---\n{_tail(log)}" for r, log in enumerate(self.logs))
        return EngineWorkerError(f"the engine workers of {self.name} stopped: {reason}\n{tails}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask rank 0 to close the group; kill whatever is still running after `grace_s`."""
        if self.failure is None and self.conn is not None and all(p.poll() is None for p in self.processes):
            with contextlib.suppress(EngineWorkerError):  # _fail has killed them: nothing is left to close
                self.request(["close"], deadline=time.monotonic() + grace_s)
        deadline = time.monotonic() + grace_s
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        self._kill()
        if self.conn is not None:
            self.conn.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def _kill(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _listen(rendezvous: Rendezvous) -> socket.socket:
    """The rendezvous socket, bound and listening here: rank 0 serves the store on it (never a port
    chosen here and bound later, which another process could take in between)."""
    family = socket.AF_INET6 if ":" in rendezvous.addr else socket.AF_INET
    try:
        return socket.create_server((rendezvous.addr, rendezvous.port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as e:
        raise ConfigError(f"cannot listen for the tensor-parallel rendezvous on {rendezvous.addr}:{rendezvous.port}: "
                          f"{e.strerror}; pick another port (Rendezvous(addr, port)), port 0 for any free one, "
                          f"or stop what holds it") from None


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    return text[-LOG_TAIL_CHARS:]
