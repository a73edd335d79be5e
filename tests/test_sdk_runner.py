"""The trusted-mode runner (spec 1.1): input, entry points, return values, output capture, errors."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path

import pytest
from inferlet_helpers import launch, start_runtime
from pie_client.inferlet import inferlet as pie_client_inferlet

from inferlet._instance import InstanceState
from pie.runtime.runner import convert_result, parse_input
from pie.runtime.runtime import Runtime
from pie.tiny_model import ensure_tiny_model

PROGRAMS = {
    "echo": "async def main(input: dict) -> dict:\n    return {'got': input}\n",
    "sync-text": "def main(input):\n    return 'plain ' + str(input.get('n', 0))\n",
    "no-args": "def main():\n    return None\n",
    "set-return": textwrap.dedent("""
        import asyncio
        import inferlet

        async def helper():
            inferlet.set_return({"from": "a child task"})

        async def main(input):
            await asyncio.gather(helper())
    """),
    "pydantic-like": textwrap.dedent("""
        class Result:
            def model_dump_json(self):
                return '{"model": "dumped"}'

        def main(input):
            return Result()
    """),
    "chatty": textwrap.dedent("""
        import asyncio
        import sys

        async def main(input):
            name = input["name"]
            for i in range(3):
                print(f"{name} line {i}")
                await asyncio.sleep(0.01)
            print(f"{name} warning", file=sys.stderr)
            return name
    """),
    "raises": textwrap.dedent("""
        def helper(x):
            return 1 / x

        async def main(input):
            return helper(0)
    """),
    "exits": "import sys\n\ndef main(input):\n    sys.exit(4)\n",
    "broken-import": "import not_a_module_anywhere\n\ndef main(input):\n    return 1\n",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
async def rt(tiny: Path, tmp_path: Path) -> Runtime:
    for name, source in PROGRAMS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (folder / "main.py").write_text(source)
    runtime_ = await start_runtime(tiny, paths=(tmp_path,))
    yield runtime_
    await runtime_.shutdown(0)


def test_input_parsing_follows_the_spec() -> None:
    assert parse_input("") == {} and parse_input(None) == {} and parse_input("  ") == {}
    assert parse_input('{"a": 1}') == {"a": 1}
    assert parse_input("not json") == {"input": "not json"}
    assert parse_input("[1, 2]") == {"input": [1, 2]}
    assert parse_input({"k": "v"}) == {"k": "v"}


def test_return_values_follow_the_spec() -> None:
    state = InstanceState()
    assert convert_result("verbatim", state) == "verbatim"
    assert convert_result({"a": [1, 2]}, state) == '{"a": [1, 2]}'
    assert convert_result(None, state) == ""
    assert json.loads(convert_result({"when": Path("/x")}, state)) == {"when": "/x"}  # default=str
    state.return_value = {"set": True}
    assert convert_result(None, state) == '{"set": true}'


async def test_entry_points_and_return_conversion(rt: Runtime) -> None:
    cases = {"echo": ({"k": 1}, '{"got": {"k": 1}}'), "sync-text": ({"n": 3}, "plain 3"), "no-args": ({}, ""),
             "set-return": ({}, '{"from": "a child task"}'), "pydantic-like": ({}, '{"model": "dumped"}')}
    for name, (given, expected) in cases.items():
        final, _ = await launch(rt, name, given)
        assert (final.kind, final.value) == ("return", expected), name


async def test_output_of_concurrent_inferlets_never_mixes(rt: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    runs = await asyncio.gather(*(launch(rt, "chatty", {"name": n}) for n in ("ann", "ben", "cy")))
    for (final, events), name in zip(runs, ("ann", "ben", "cy"), strict=True):
        assert final.value == name
        stdout = "".join(e.value for e in events if e.kind == "stdout")
        stderr = "".join(e.value for e in events if e.kind == "stderr")
        assert stdout == "".join(f"{name} line {i}\n" for i in range(3))
        assert stderr == f"{name} warning\n"
    print("outside any inferlet")
    assert "outside any inferlet" in capsys.readouterr().out  # the server's own output is untouched
    assert not type(sys.stdout).__name__.startswith("_Routed")  # proxies removed after the last run


async def test_errors_carry_the_programs_own_frames(rt: Runtime) -> None:
    final, _ = await launch(rt, "raises", {})
    assert final.kind == "error"
    assert "raises@0.1.0 raised: ZeroDivisionError: division by zero" in final.value
    assert 'File "raises@0.1.0/main.py", line 3, in helper' in final.value and "return 1 / x" in final.value
    assert "pie/runtime" not in final.value  # no runtime frames

    final, _ = await launch(rt, "exits", {})
    assert final.kind == "error" and "SystemExit: 4" in final.value  # and the server is still here
    final, _ = await launch(rt, "broken-import", {})
    assert final.kind == "error" and "failed while loading: ModuleNotFoundError" in final.value
    final, _ = await launch(rt, "echo", {"after": "errors"})
    assert final.kind == "return"


@pie_client_inferlet
async def shout(word: str, times: int = 2):  # type: ignore[no-untyped-def]
    """Repeat a word."""
    import inferlet

    return {"text": " ".join([word.upper()] * times), "user": inferlet.runtime.username()}


async def test_pie_client_inferlet_upload_runs_with_keyword_arguments(rt: Runtime) -> None:
    """Exactly what pie-client's `@inferlet` uploads: the function's source and a manifest naming it."""
    info = rt.add_program(shout.name, shout.version, {"main.py": shout.source.encode()}, shout.manifest_toml(),
                          owner="zoe")
    assert info.description == "Repeat a word." and info.parameters["times"]["optional"]
    final, _ = await launch(rt, shout.program, {"word": "hey", "times": 3}, username="zoe")
    assert json.loads(final.value) == {"text": "HEY HEY HEY", "user": "zoe"}
    final, _ = await launch(rt, "shout", {"word": "yo"}, username="zoe")  # bare name: the latest version
    assert json.loads(final.value)["text"] == "YO YO"
