"""Containing a trusted inferlet's `BaseException`s and the tasks it spawns.

asyncio treats `KeyboardInterrupt` and `SystemExit` raised inside a task as
the program's: `Task.__step` re-raises them out of the event loop, so
`sys.exit(3)` in a task an inferlet created with `asyncio.create_task` would
stop the whole server with code 3. (`GeneratorExit` does not escape the loop,
but it is no exception an inferlet may end the server's bookkeeping with
either.)

`contained_tasks(on_escape)` wraps the block that runs one inferlet: every
task created in it (and in the tasks it spawns: the marker is a context
variable, which tasks copy) runs its coroutine inside a guard that turns
those three into an `EscapedError` (a plain `Exception`) and reports them to
`on_escape`, which ends that instance alone. When the block ends, tasks the
inferlet left running are cancelled: they belong to the instance.

The main task is guarded by the runner itself (`run_program` catches
`BaseException` around the entry call). Callbacks scheduled with
`loop.call_soon` are not covered: trusted mode is for code that is not
hostile (use `[runtime] isolation = "isolated"` for code you do not trust).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import Any

ESCAPES = (KeyboardInterrupt, SystemExit, GeneratorExit)
OnEscape = Callable[[BaseException], None]


class EscapedError(Exception):
    """An inferlet's task raised KeyboardInterrupt, SystemExit or GeneratorExit; only its instance ends."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        self.original = error


class _Scope:
    """One inferlet run: where escapes are reported and which tasks it spawned."""

    def __init__(self, on_escape: OnEscape) -> None:
        self.on_escape = on_escape
        self.tasks: set[asyncio.Task[Any]] = set()


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("inferlet_task_scope", default=None)


@contextlib.contextmanager
def contained_tasks(on_escape: OnEscape) -> Iterator[None]:
    """Guard every task created inside the block; cancel the ones still running when it ends."""
    _install(asyncio.get_running_loop())
    scope = _Scope(on_escape)
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)
        for task in list(scope.tasks):
            task.cancel()


async def _guarded(coro: Coroutine[Any, Any, Any], scope: _Scope) -> Any:
    me = asyncio.current_task()
    try:
        return await coro
    except ESCAPES as error:
        if isinstance(error, GeneratorExit) and _current_task() is not me:
            raise  # the task is being closed from outside (garbage-collected pending): not the inferlet's
        scope.on_escape(error)
        raise EscapedError(error) from None


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _install(loop: asyncio.AbstractEventLoop) -> None:
    """Put our task factory on `loop` (once), delegating to the factory it had."""
    previous = loop.get_task_factory()
    if getattr(previous, "contains_inferlets", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
                **kwargs: Any) -> asyncio.Future[Any]:
        context = kwargs.get("context")
        scope = _scope.get() if context is None else context.get(_scope, None)
        inner = coro
        if scope is not None and isinstance(coro, Coroutine):
            coro = _guarded(coro, scope)
        task = previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
        if scope is not None and isinstance(task, asyncio.Task):
            scope.tasks.add(task)
            task.add_done_callback(scope.tasks.discard)
            if isinstance(inner, Coroutine):
                # Cancelled before its first step, the guard never awaited `inner`: close it quietly.
                task.add_done_callback(lambda _: inner.close())
        return task

    factory.contains_inferlets = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)
