"""An instance: one launched inferlet, as the server sees it (`pie.runtime.api.ProcessAPI`).

It runs a *body* (a coroutine function given the instance; normally the
runner executing the program's `main`) as one asyncio task. Whatever way the
body ends (return, exception, wall-time limit, termination) is turned into
exactly one final event, and in the same `finally` the instance's host frees
every context, page and subscription it held.

Events are buffered until a subscriber reads them (`events()`); a new
subscriber (attach) takes over from the previous one. A subscriber that
arrives after the end still gets the final event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from inferlet._host import HostError
from pie.errors import InferletError, PieError, RequestError
from pie.runtime.api import FINAL_EVENTS, Event, EventKind, ProcessStatus
from pie.runtime.containment import ESCAPES
from pie.runtime.quotas import ByteQuota, size_of

if TYPE_CHECKING:
    from pie.runtime.host import InstanceHost

log = logging.getLogger(__name__)

Body = Callable[["Instance"], Awaitable[str]]
MAX_TRACEBACK_CHARS = 8000
OUTPUT_KINDS = frozenset({"stdout", "stderr", "message", "file"})


@dataclass(frozen=True)
class InstanceLimits:
    """Per-instance limits; 0 means none (beyond the KV pool itself). The [runtime] key of each is named
    in the error an instance over it gets (pie.runtime.runtime.RuntimeLimits)."""

    max_pages: int = 0  # KV pages held across the instance's contexts (reserved capacity)
    max_page_share: float = 0.0  # of one pool's pages (max_page_share_per_instance)
    max_contexts: int = 0  # live contexts (max_contexts_per_instance)
    forks_per_s: float = 0.0  # fork rate (max_forks_per_s), with a burst of `fork_burst`
    fork_burst: int = 1
    max_tokens: int = 0  # tokens sampled over the instance's life
    max_wall_time_s: float = 0.0
    max_buffered_events: int = 10_000  # oldest non-final events are dropped beyond this while detached
    max_buffered_event_bytes: int = 0  # ... and beyond this many bytes
    max_inbox_bytes: int = 0  # client messages and files sent and not yet received
    max_images: int = 0  # images prepared (max_images_per_instance)
    max_image_pixels: int = 0  # width x height of one image (max_image_pixels)
    max_audio_seconds: float = 0.0  # one audio clip (max_audio_seconds)


class Instance:
    def __init__(self, instance_id: str, program: str, username: str, limits: InstanceLimits,
                 event_bytes: ByteQuota | None = None) -> None:
        """`event_bytes`: the per-user quota of buffered event bytes this instance's events count in."""
        self.id = instance_id
        self.program = program
        self.username = username
        self.limits = limits
        self.status: ProcessStatus = "running"
        self.started_at = time.time()
        self.ended_at: float | None = None  # frozen at the final event (list_processes' elapsed_secs)
        self.input = ""  # the launch input (JSON text), when launched from a program
        self.host: InstanceHost | None = None  # set by the runtime before start()
        self.messages: asyncio.Queue[str] = asyncio.Queue()  # client -> session.receive()
        self.files: asyncio.Queue[bytes] = asyncio.Queue()  # client -> session.receive_file()
        self.dropped_events = 0
        self._events: collections.deque[Event] = collections.deque()
        self._event_bytes = 0  # held by `_events`, in this instance's count and in the user's
        self._user_event_bytes = event_bytes or ByteQuota(0, "max_buffered_event_bytes_per_user")
        self._inbox_bytes = 0  # messages + files sent and not yet received
        self._ready = asyncio.Event()
        self._reader = 0  # generation of the current subscriber
        self._final: Event | None = None
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_reason = ""
        self._wall_clock: asyncio.Timeout | None = None  # the wall-time limit of the running body
        self._on_exit: Callable[[Instance], None] | None = None

    def start(self, body: Body, on_exit: Callable[[Instance], None] | None = None) -> None:
        """Run `body`; `on_exit(self)` is called once everything is released and the final event is out."""
        assert self._task is None and self.host is not None, "start once, after the host is set"
        self._on_exit = on_exit
        self._task = asyncio.get_running_loop().create_task(self._run(body), name=f"inferlet-{self.id}")

    # -- ProcessAPI -----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        self._reader += 1
        me = self._reader
        self._ready.set()  # wake the previous subscriber so it sees it was replaced
        delivered_final = False
        while me == self._reader:
            if self._events:
                event = self._pop_event()
                yield event
                if event.kind in FINAL_EVENTS:
                    return
                continue
            if self._final is not None and self._done.is_set():
                if not delivered_final:  # a late subscriber: the outcome, once
                    delivered_final = True
                    yield self._final
                return
            self._ready.clear()
            await self._ready.wait()

    def send_message(self, message: str) -> None:
        self._check_inbox(size_of(message), "message")
        self.messages.put_nowait(message)

    def send_file(self, data: bytes) -> None:
        self._check_inbox(len(data), "file")
        self.files.put_nowait(data)

    def _check_inbox(self, n: int, what: str) -> None:
        cap = self.limits.max_inbox_bytes
        if cap and self._inbox_bytes + n > cap:
            raise RequestError(f"this {what} of {n} bytes would give process {self.id} {self._inbox_bytes + n} "
                               f"bytes it has not received yet, over the limit of {cap} ([runtime] "
                               "max_inbox_bytes); wait for the inferlet to receive what was sent")
        self._inbox_bytes += n

    async def terminate(self, reason: str = "terminated by client") -> None:
        if self._task is not None and not self._task.done():
            self._stop_reason = reason
            self._task.cancel()
        await self._done.wait()

    async def wait(self) -> Event:
        await self._done.wait()
        assert self._final is not None
        return self._final

    # -- the inferlet's side --------------------------------------------------------------------

    async def receive_message(self) -> str:
        message = await self.messages.get()
        self._inbox_bytes -= size_of(message)
        return message

    async def receive_file(self) -> bytes:
        data = await self.files.get()
        self._inbox_bytes -= len(data)
        return data

    def emit(self, kind: str, value: str | bytes) -> None:
        """An output event (stdout, stderr, message, file); ignored once the instance has ended.

        Past `max_buffered_events` events or `max_buffered_event_bytes` bytes waiting for the client, or
        the user's `max_buffered_event_bytes_per_user`, the oldest are dropped (`dropped_events`); an
        event that cannot fit even then is refused with HostError naming the limit."""
        assert kind in OUTPUT_KINDS, f"{kind!r} is not an output event kind"
        if self._final is not None:
            return
        n, cap, user = size_of(value), self.limits.max_buffered_event_bytes, self._user_event_bytes
        if cap and n > cap:
            raise HostError(f"a {kind} event of {n} bytes is over the limit of {cap} bytes buffered per "
                            "instance ([runtime] max_buffered_event_bytes); send it in smaller pieces")
        while self._events and (len(self._events) >= self.limits.max_buffered_events
                                or (cap and self._event_bytes + n > cap) or not user.fits(self.username, n)):
            self._pop_event()
            self.dropped_events += 1
        if not user.fits(self.username, n):
            raise HostError(user.over(self.username, n, f"a {kind} event"))
        self._events.append(Event(cast(EventKind, kind), value))
        self._event_bytes += n
        user.take(self.username, n)
        self._ready.set()

    def _pop_event(self) -> Event:
        event = self._events.popleft()
        if event.kind not in FINAL_EVENTS:  # the final event is not counted (it is kept apart too)
            n = size_of(event.value)
            self._event_bytes -= n
            self._user_event_bytes.give(self.username, n)
        return event

    def forget(self) -> None:
        """Free what a finished instance still buffers (its retention time is up)."""
        assert self.done, "only a finished instance is forgotten"
        while self._events:
            self._pop_event()
        self._reader += 1  # a subscriber still waiting ends
        self._ready.set()

    def restart_wall_clock(self) -> None:
        """Count the wall-time limit from now: time spent queued for admission is not the inferlet's."""
        if self._wall_clock is not None and self.limits.max_wall_time_s:
            self._wall_clock.reschedule(asyncio.get_running_loop().time() + self.limits.max_wall_time_s)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def _run(self, body: Body) -> None:
        final = Event("error", "the instance ended without a result")
        try:
            limit = self.limits.max_wall_time_s or None
            async with asyncio.timeout(limit) as self._wall_clock:
                result = await body(self)
            final, self.status = Event("return", result), "finished"
        except TimeoutError:
            final, self.status = Event("error", f"stopped: the inferlet ran past its wall-time limit of "
                                                f"{self.limits.max_wall_time_s:g} s (raise [runtime] "
                                                "max_wall_time_s, or make it finish sooner)"), "failed"
        except asyncio.CancelledError:
            final, self.status = Event("error", self._stop_reason or "terminated"), "terminated"
        except (Exception, *ESCAPES) as error:  # a body's SystemExit & co end this instance, not the server
            final, self.status = Event("error", describe_error(error)), "failed"
        finally:
            self._release()
            self.ended_at = time.time()
            self._final = final
            self._events.append(final)
            self._ready.set()
            self._done.set()
            if self._on_exit is not None:
                self._on_exit(self)

    def _release(self) -> None:
        assert self.host is not None
        try:
            self.host.close()
        except Exception:  # a bug in cleanup must not leave the instance unfinished
            log.exception("releasing the resources of instance %s failed", self.id)


def describe_error(error: BaseException) -> str:
    """The message a client sees: the runner's report, a host/runtime error's own words, or a traceback."""
    if isinstance(error, InferletError):  # already the program's error with its own frames
        return str(error)
    if isinstance(error, HostError | PieError):
        return f"{type(error).__name__}: {error}"
    text = "".join(traceback.format_exception(error))
    return text if len(text) <= MAX_TRACEBACK_CHARS else "...\n" + text[-MAX_TRACEBACK_CHARS:]
