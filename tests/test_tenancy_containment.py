"""Trusted mode: KeyboardInterrupt, SystemExit and GeneratorExit raised by an inferlet, in its main task or a
task it spawned, end that instance only; the runtime serves the next inferlet normally."""

from __future__ import annotations

import json
import textwrap

import pytest
import pytest_asyncio
from inferlet_helpers import launch, start_runtime

from pie.runtime.runtime import Runtime
from pie.tiny_model import ensure_tiny_model

PROGRAMS = {
    "main-interrupt": "async def main(input):\n    raise KeyboardInterrupt('from main')\n",
    "main-exit": "import sys\n\nasync def main(input):\n    sys.exit(3)\n",
    "main-generator-exit": "async def main(input):\n    raise GeneratorExit('from main')\n",
    "sync-interrupt": "def main(input):\n    raise KeyboardInterrupt\n",
    "import-exit": "import sys\nsys.exit(5)\n\ndef main(input):\n    return 1\n",
    "spawned": textwrap.dedent("""
        import asyncio
        import sys

        async def boom(kind):
            await asyncio.sleep(0)
            if kind == "exit":
                sys.exit(3)
            if kind == "interrupt":
                raise KeyboardInterrupt("from a spawned task")
            raise GeneratorExit("from a spawned task")

        async def main(input):
            task = asyncio.create_task(boom(input["kind"]))
            await asyncio.sleep(30)  # the escape must end us long before this
            return "survived " + str(task)
    """),
    "leaves-a-task": textwrap.dedent("""
        import asyncio

        async def forever():
            while True:
                await asyncio.sleep(0.01)

        async def main(input):
            asyncio.create_task(forever(), name="left-behind")
            return "done"
    """),
}
NEXT = ("text-completion", {"prompt": "Count to three.", "max_tokens": 4})


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rt(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    tiny = ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))
    programs = tmp_path_factory.mktemp("programs")
    for name, source in PROGRAMS.items():
        (programs / name).mkdir()
        (programs / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (programs / name / "main.py").write_text(source)
    runtime_ = await start_runtime(tiny, paths=(programs,))  # one runtime: each test checks it still serves
    yield runtime_
    await runtime_.shutdown(0)


@pytest.mark.parametrize(("program", "kind", "expected"), [
    ("main-interrupt", None, "KeyboardInterrupt"),
    ("main-exit", None, "SystemExit: 3"),
    ("main-generator-exit", None, "GeneratorExit"),
    ("sync-interrupt", None, "KeyboardInterrupt"),
    ("import-exit", None, "SystemExit: 5"),
    ("spawned", "exit", "SystemExit: 3"),
    ("spawned", "interrupt", "KeyboardInterrupt"),
    ("spawned", "generator-exit", "GeneratorExit"),
])
async def test_base_exceptions_end_only_their_instance(rt: Runtime, program: str, kind: str | None,
                                                       expected: str) -> None:
    process = await rt.launch(program, json.dumps({"kind": kind} if kind else {}), username="alice")
    final = await process.wait()
    assert final.kind == "error" and expected in str(final.value), final.value
    assert "survived" not in str(final.value) and process.status == "failed"
    final, _ = await launch(rt, *NEXT)  # the runtime keeps serving
    assert final.kind == "return", final.value


async def test_tasks_an_inferlet_leaves_running_are_cancelled(rt: Runtime) -> None:
    import asyncio

    final, _ = await launch(rt, "leaves-a-task", {})
    assert (final.kind, final.value) == ("return", "done")
    await asyncio.sleep(0)  # the cancellation lands on the task's next step
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "left-behind" and not t.done()]
