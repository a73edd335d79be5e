"""A thread that makes SIGINT/SIGTERM work while something blocks the event loop.

The server handles signals on its event loop (`capture_signals`): the signal
only wakes the loop, which then runs the handler. A trusted inferlet spinning
without `await` (`while True: pass`) keeps the loop from ever getting there,
so the signal would be ignored and only SIGKILL would stop the server.

`watch_signals(grace_s)` records each signal in a Python-level handler (which
the interpreter runs in the main thread between bytecodes, even inside such a
loop) and keeps a heartbeat on the event loop. A daemon thread checks both:
once a signal has arrived, if the loop has not beaten for `grace_s` (for
`SECOND_SIGNAL_GRACE_S` after a second signal), it logs why and ends the
process with `os._exit(128 + signal number)`, skipping a shutdown that cannot
run. While the loop keeps beating, the normal (graceful, bounded) shutdown is
left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("pie.server")

BEAT_S = 0.1  # how often the loop proves it is running
POLL_S = 0.05  # how often the thread looks
SECOND_SIGNAL_GRACE_S = 1.0  # a second signal means "now"


class SignalWatchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, grace_s: float, signals: tuple[int, ...]) -> None:
        self.grace_s = max(grace_s, SECOND_SIGNAL_GRACE_S)  # a zero shutdown timeout must not kill on any hiccup
        self._loop = loop
        self._signals = signals
        self._beat = time.monotonic()
        self._received: list[tuple[int, float]] = []  # (signal number, monotonic time), appended only
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._watch, name="pie-signal-watchdog", daemon=True)

    def start(self) -> None:
        for sig in self._signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)  # the loop's wakeup fd still gets the signal (set_wakeup_fd)
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._thread.join(1.0)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.append((signum, time.monotonic()))
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def _tick(self) -> None:
        self._beat = time.monotonic()
        self._timer = self._loop.call_later(BEAT_S, self._tick)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if not self._received:
                continue
            signum, at = self._received[-1]
            grace = SECOND_SIGNAL_GRACE_S if len(self._received) > 1 else self.grace_s
            now = time.monotonic()
            stalled_since = max(self._beat, at)
            if now - stalled_since > grace:
                self._force_exit(signum, now - self._beat)

    def _force_exit(self, signum: int, stalled_s: float) -> None:
        name = signal.Signals(signum).name
        log.critical("%s received, but the event loop has not run for %.1f s (an inferlet blocks it: code that "
                     "never awaits); exiting now without a graceful shutdown. Run untrusted inferlets with "
                     "[runtime] isolation = \"isolated\"", name, stalled_s)
        for handler in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(128 + signum)


@contextlib.contextmanager
def watch_signals(grace_s: float, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Force the exit when a signal arrives and the running loop stays blocked for `grace_s`. Only in the
    main thread (the only one signals reach); elsewhere a no-op. Enter it after the loop's signal handlers
    are installed, so theirs are the handlers it chains to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watchdog = SignalWatchdog(asyncio.get_running_loop(), grace_s, signals)
    watchdog.start()
    try:
        yield
    finally:
        watchdog.stop()
