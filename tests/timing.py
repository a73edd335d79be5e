"""Deadlines for the tests, scaled for slow or loaded machines.

A deadline here is how long a test waits for something that should happen (a server to come up, a
process to exit) before it calls it a failure; it never decides what passes on a working machine,
so it can be generous. `scaled(s)` is `s` times PIE_TEST_TIME_SCALE (default 3: a 2-core machine
shared with other jobs is several times slower than an idle workstation); raise it further on
emulated or very slow hardware, e.g. PIE_TEST_TIME_SCALE=10. Waits for a condition poll it with
`wait_for` / `wait_for_async` instead of sleeping a guessed time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

DEFAULT_SCALE = 3.0
POLL_S = 0.01


def time_scale() -> float:
    raw = os.environ.get("PIE_TEST_TIME_SCALE", "")
    try:
        scale = float(raw) if raw else DEFAULT_SCALE
    except ValueError:
        raise ValueError(f"PIE_TEST_TIME_SCALE must be a number (a factor on the tests' deadlines), got {raw!r}") from None
    if scale <= 0:
        raise ValueError(f"PIE_TEST_TIME_SCALE must be positive, got {scale}")
    return scale


def scaled(seconds: float) -> float:
    """`seconds` (what a quiet machine needs, with margin) stretched for this machine."""
    return seconds * time_scale()


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after scaled(`seconds`)."""
    deadline = time.monotonic() + scaled(seconds)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(seconds):g} s waiting for {what}")
        time.sleep(POLL_S)


async def wait_for_async(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """`wait_for` on an event loop: the loop keeps running between polls."""
    deadline = time.monotonic() + scaled(seconds)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(seconds):g} s waiting for {what}")
        await asyncio.sleep(POLL_S)
