"""Running an inferlet program (trusted mode: in the server's event loop, as the instance's task).

`run_program` does what Pie's generated Python wrapper does (spec 1.1):

- input: JSON text -> its value; empty -> {}; not JSON -> {"input": raw}
  (a dict is taken as is);
- calls the entry function (`main` unless the manifest names another) with
  the input dict, or with it as keyword arguments (`[runtime] call =
  "kwargs"`, what pie-client's `@inferlet` uploads); sync or async;
- the result: a str verbatim; None -> the value given to `set_return`, or
  ""; an object with `model_dump_json()` -> that; anything else ->
  `json.dumps(value, default=str)`;
- an exception -> `InferletError` whose message is the exception and the
  last frames of the program's own code. `SystemExit`, `KeyboardInterrupt`
  and `GeneratorExit` too, raised in `main`, at import or in a task the
  program spawned (`pie.runtime.containment`): they end this instance only.

Output of `print` (and anything else writing to sys.stdout / sys.stderr)
inside the run becomes stdout / stderr events of *this* instance: the
process-wide streams are replaced by proxies that route by a context
variable, so concurrent inferlets never mix their output, and code outside
any inferlet writes through unchanged.

A synchronous `main` runs on the event loop: it must not block (use isolated
mode for code you do not trust to behave).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import io
import json
import linecache
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from inferlet._host import Host
from inferlet._instance import UNSET, InstanceState, use_instance
from pie.errors import InferletError, ProgramError
from pie.runtime.containment import contained_tasks
from pie.runtime.deps import import_path
from pie.runtime.programs import ENTRY_FILE, Program

if TYPE_CHECKING:
    from pie.runtime.sandbox.policy import SandboxPolicy

Emit = Callable[[str, str | bytes], None]
MAX_USER_FRAMES = 8
_LINE_FLUSH_CHARS = 8192


def parse_input(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"input": raw}
    return value if isinstance(value, dict) else {"input": value}


def convert_result(value: Any, state: InstanceState) -> str:
    if value is None:
        value = None if state.return_value is UNSET else state.return_value
        if value is None:
            return ""
    if isinstance(value, str):
        return value
    dump = getattr(value, "model_dump_json", None)
    if callable(dump):
        return str(dump())
    return json.dumps(value, default=str)


def load_entry(program: Program, module_name: str) -> tuple[Callable[..., Any], types.ModuleType]:
    """Execute the program's main.py as a fresh module; return its entry function and the module."""
    source = program.source()
    filename = f"{program.spec}/{ENTRY_FILE}"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as e:
        raise ProgramError(f"{program.spec}: syntax error in {ENTRY_FILE} line {e.lineno}: {e.msg}") from None
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module  # dataclasses and typing resolve names through sys.modules
    try:
        exec(code, module.__dict__)
    except BaseException as e:  # sys.exit() at import time too: it ends this instance, not the server
        sys.modules.pop(module_name, None)
        raise InferletError(user_traceback(e, filename, f"{program.spec} failed while loading")) from None
    entry = module.__dict__.get(program.manifest.entry)
    if not callable(entry):
        sys.modules.pop(module_name, None)
        raise ProgramError(f"{program.spec}: {ENTRY_FILE} defines no function {program.manifest.entry}(); "
                           f"define `async def {program.manifest.entry}(input: dict)`")
    return entry, module


async def run(program: Program, input: str | dict[str, Any] | None, host: Host, emit: Emit, *,
              sandbox: SandboxPolicy | None = None) -> str:
    """Run `program` for one instance: trusted (in this event loop) or, with a policy, in a sandbox process."""
    deps_path = import_path(program.root, program.spec)  # refused here when declared but not installed
    if sandbox is None:
        if deps_path is not None and deps_path not in sys.path:
            # Trusted inferlets share this interpreter, so its installed dependencies become importable
            # by every trusted inferlet (isolated ones see only their own).
            sys.path.append(deps_path)
        return await run_program(program, input, host, emit)
    from pie.runtime.sandbox.server import run_isolated

    return await run_isolated(program, input, host, emit, sandbox, username=host.username(),
                              instance_id=host.instance_id(), import_paths=[deps_path] if deps_path else [])


async def run_program(program: Program, input: str | dict[str, Any] | None, host: Host, emit: Emit, *,
                      state: InstanceState | None = None) -> str:
    """Run `program` for one instance with `host` installed; returns the result text, raises on failure."""
    data = parse_input(input)
    module_name = f"_inferlet_{host.instance_id().replace('-', '_')}"
    filename = f"{program.spec}/{ENTRY_FILE}"
    main = asyncio.current_task()
    escaped: list[BaseException] = []

    def on_escape(error: BaseException) -> None:
        """A task the inferlet spawned raised SystemExit & co: end this instance (and only it)."""
        if not escaped and main is not None:
            escaped.append(error)
            main.cancel()

    with use_instance(host, state) as current, routed_output(emit), contained_tasks(on_escape):
        entry, _ = load_entry(program, module_name)
        try:
            result = call_entry(entry, data, program.manifest.call)
            if inspect.isawaitable(result):
                result = await result
            return convert_result(result, current)
        except asyncio.CancelledError:
            if escaped:  # our own cancellation, on behalf of a spawned task
                if main is not None:
                    main.uncancel()
                raise InferletError(user_traceback(escaped[0], filename,
                                                   f"{program.spec}: a task it spawned raised")) from None
            raise  # terminated, or past its wall time
        except BaseException as e:  # SystemExit, KeyboardInterrupt, GeneratorExit too: never the server's
            raise InferletError(user_traceback(e, filename, f"{program.spec} raised")) from None
        finally:
            sys.modules.pop(module_name, None)


def call_entry(entry: Callable[..., Any], data: dict[str, Any], call: str) -> Any:
    if call == "kwargs":
        return entry(**data)
    if not inspect.signature(entry).parameters:
        return entry()
    return entry(data)


def user_traceback(error: BaseException, filename: str, headline: str) -> str:
    """The error and the last frames of the program's own code (the SDK's and pie's frames are noise)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
    lines = [f"{headline}: {type(error).__name__}: {error}"]
    if frames:
        lines.append("Traceback (most recent call last, inferlet frames only):")
        lines += [line.rstrip("\n") for line in traceback.format_list(frames[-MAX_USER_FRAMES:])]
    return "\n".join(lines)


# -- output routing -------------------------------------------------------------------------------

_route: contextvars.ContextVar[tuple[_Sink, _Sink] | None] = contextvars.ContextVar("inferlet_output", default=None)
_install_lock = threading.Lock()
_installs = [0]  # active routed_output() blocks; the proxies come out when the last one ends


class _Sink:
    """One instance's stdout or stderr: line-buffered into events."""

    def __init__(self, emit: Emit, kind: str) -> None:
        self._emit = emit
        self._kind = kind
        self._buffer = io.StringIO()

    def write(self, text: str) -> int:
        self._buffer.write(text)
        if "\n" in text or self._buffer.tell() >= _LINE_FLUSH_CHARS:
            self.flush()
        return len(text)

    def flush(self) -> None:
        text = self._buffer.getvalue()
        if text:
            self._buffer = io.StringIO()
            self._emit(self._kind, text)


class _RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr: writes go to the current instance's sink, if any."""

    def __init__(self, fallback: TextIO, which: int) -> None:
        self.fallback = fallback
        self._which = which  # 0 = stdout, 1 = stderr

    def _target(self) -> Any:
        sinks = _route.get()
        return sinks[self._which] if sinks is not None else self.fallback

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", "utf-8")


@contextlib.contextmanager
def routed_output(emit: Emit) -> Iterator[None]:
    """Route this task's (and its child tasks') stdout/stderr to `emit` as stdout/stderr events."""
    sinks = (_Sink(emit, "stdout"), _Sink(emit, "stderr"))
    with _install_lock:
        _installs[0] += 1
        if not isinstance(sys.stdout, _RoutedStream):
            sys.stdout = _RoutedStream(sys.stdout, 0)
        if not isinstance(sys.stderr, _RoutedStream):
            sys.stderr = _RoutedStream(sys.stderr, 1)
    token = _route.set(sinks)
    try:
        yield
    finally:
        _route.reset(token)
        for sink in sinks:
            sink.flush()
        with _install_lock:
            _installs[0] -= 1
            if _installs[0] == 0:
                for name in ("stdout", "stderr"):
                    stream = getattr(sys, name)
                    if isinstance(stream, _RoutedStream):
                        setattr(sys, name, stream.fallback)
