"""Running SDK code and inferlet programs on the real runtime (tiny random qwen3 on CPU).

`run_sdk(runtime, fn)` runs `await fn()` as an instance with the SDK wired to that instance's host, the
way the runner does for a program; `launch(runtime, name, input)` runs a program from the registry and
collects its events.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from inferlet._instance import use_instance
from pie.engine.config import EngineConfig
from pie.runtime.api import Event
from pie.runtime.instance import Instance
from pie.runtime.runtime import ModelSpec, Runtime, RuntimeConfig, RuntimeLimits


async def start_runtime(model_dir: Path, *, limits: RuntimeLimits | None = None, paths: tuple[Path, ...] = (),
                        pie_home: Path | None = None, **engine: Any) -> Runtime:
    cfg = {"model": str(model_dir), "device": "cpu", "max_num_kv_pages": 256, **engine}
    config = RuntimeConfig((ModelSpec("tiny", EngineConfig(**cfg)),), limits or RuntimeLimits(),
                           inferlet_paths=paths, pie_home=pie_home or model_dir.parent.parent.parent)
    return await Runtime.start(config)


async def run_sdk(runtime: Runtime, fn: Callable[[], Awaitable[Any]], username: str = "alice") -> Any:
    """`await fn()` inside an instance (SDK calls go to its host); its value, or its error re-raised."""
    box: dict[str, Any] = {}

    async def body(instance: Instance) -> str:
        assert instance.host is not None
        with use_instance(instance.host):
            try:
                box["value"] = await fn()
            except BaseException as e:
                box["error"] = e
                raise
        return "ok"

    await runtime.spawn(body, program="sdk-test", username=username).wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def launch(runtime: Runtime, program: str, input: dict[str, Any] | str, username: str = "alice",
                 **kwargs: Any) -> tuple[Event, list[Event]]:
    """Launch a program and drain it: (final event, every event before it)."""
    text = input if isinstance(input, str) else json.dumps(input)
    process = await runtime.launch(program, text, username=username, **kwargs)
    events = [e async for e in process.events()]
    return events[-1], events[:-1]


async def result(runtime: Runtime, program: str, input: dict[str, Any], **kwargs: Any) -> Any:
    """A program's return value (JSON-decoded when it is JSON); fails the test on an error event."""
    final, _ = await launch(runtime, program, input, **kwargs)
    assert final.kind == "return", final.value
    try:
        return json.loads(final.value)
    except json.JSONDecodeError:
        return final.value


def pages_in_use(runtime: Runtime) -> int:
    return runtime.model().pool.num_used
