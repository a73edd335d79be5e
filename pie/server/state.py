"""What every connection shares: the runtime, the options, auth, metrics, and the server's tasks.

`TaskRegistry` keeps a reference to every task the server spawns (event
pumps, detach reapers, run watchers) so none is garbage-collected mid-flight
and shutdown can cancel them all. `Attachments` records which connection
streams which process; a process left with no connection is terminated after
`detach_timeout_s` unless someone attaches again (see docs/client.md,
"Disconnects").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from pie.runtime.api import ProcessAPI, RuntimeAPI
from pie.server.auth import Authenticator
from pie.server.metrics import Metrics
from pie.server.options import ServerOptions

log = logging.getLogger(__name__)


class TaskRegistry:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the tasks in flight to finish by themselves."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Subscriber(Protocol):
    """A connection that streams processes' events (a `Session`)."""

    def release(self, process_id: str) -> None: ...


class Attachments:
    """process id -> the one connection streaming its events. Attaching takes a process over."""

    def __init__(self, tasks: TaskRegistry, detach_timeout_s: float) -> None:
        self._owner: dict[str, Subscriber] = {}
        self._reaping: dict[str, object] = {}  # process id -> token of the reaper that may terminate it
        self._tasks = tasks
        self._detach_timeout_s = detach_timeout_s

    def attach(self, process: ProcessAPI, subscriber: Subscriber) -> None:
        self._reaping.pop(process.id, None)
        previous = self._owner.get(process.id)
        self._owner[process.id] = subscriber
        if previous is not None and previous is not subscriber:
            previous.release(process.id)

    def finished(self, process_id: str, subscriber: Subscriber) -> None:
        if self._owner.get(process_id) is subscriber:
            del self._owner[process_id]

    def detach(self, process: ProcessAPI, subscriber: Subscriber) -> None:
        """`subscriber` went away; the process runs on, and is terminated if nobody attaches in time."""
        if self._owner.get(process.id) is not subscriber:
            return
        del self._owner[process.id]
        if process.status == "running":
            token = self._reaping[process.id] = object()
            self._tasks.spawn(self._reap(process, token), name=f"reap-{process.id}")

    def is_attached(self, process_id: str) -> bool:
        return process_id in self._owner

    async def _reap(self, process: ProcessAPI, token: object) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self._detach_timeout_s)
        except TimeoutError:
            if self._reaping.get(process.id) is token and process.status == "running":
                log.info("terminating process %s: detached for %g s", process.id, self._detach_timeout_s)
                await process.terminate(f"no client attached for {self._detach_timeout_s:g} s")
        finally:
            if self._reaping.get(process.id) is token:
                del self._reaping[process.id]


@dataclass
class ServerState:
    runtime: RuntimeAPI
    options: ServerOptions
    auth: Authenticator
    metrics: Metrics = field(default_factory=Metrics)
    tasks: TaskRegistry = field(default_factory=TaskRegistry)
    attachments: Attachments = field(init=False)
    shutting_down: bool = False

    def __post_init__(self) -> None:
        self.attachments = Attachments(self.tasks, self.options.detach_timeout_s)


STATE = web.AppKey("state", ServerState)  # the aiohttp application's handle on the shared state
