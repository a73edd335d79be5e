"""Trusted mode: inferlets that raise, loop, hoard pages or send garbage are each stopped with a clear
error while a well-behaved one beside them finishes with exactly its solo result."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from inferlet_helpers import launch, pages_in_use, start_runtime
from timing import scaled, wait_for_async

from pie.runtime.runtime import Runtime, RuntimeLimits
from pie.tiny_model import ensure_tiny_model

PROGRAMS = {
    "raiser": "async def main(input):\n    raise ValueError('bad input 42')\n",
    "spinner": textwrap.dedent("""
        import asyncio

        async def main(input):
            while True:
                await asyncio.sleep(0)
    """),
    "page-hog": textwrap.dedent("""
        from inferlet import Context, Model

        async def main(input):
            ctx = Context(Model.load(""))
            while True:
                ctx.append(list(range(100, 116)))
                await ctx.flush()
    """),
    "garbage": textwrap.dedent("""
        from inferlet import Context, Model, Sampler

        async def main(input):
            ctx = Context(Model.load(""))
            fwd = ctx.forward().input([1, 2, 3])
            kind = input["kind"]
            if kind == "short-mask":
                fwd.attention_mask([[0, 1], [0, 2], [0, 99]])
            elif kind == "negative-run":
                fwd.attention_mask([[0, 1, 2], [0, 2, 1], [-5, 8]])
            elif kind == "empty-logit-mask":
                fwd.mask([512])
                fwd.sample([2], Sampler.argmax())
            elif kind == "bad-token":
                fwd.input([10**6])
            await fwd.execute()
            return "accepted garbage"
    """),
}
WELL_BEHAVED = ("text-completion", {"prompt": "Count to three.", "max_tokens": 12})
# Nothing in `rt` is meant to meet its wall-time limit: how long the neighbour takes beside the spinner
# and the page hog depends on the machine's load (~5x its solo time on a loaded 2-core machine).
GENEROUS_WALL_S = scaled(60.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("pie-home"))


@pytest.fixture
def programs(tmp_path: Path) -> Path:
    for name, source in PROGRAMS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "Pie.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n')
        (tmp_path / name / "main.py").write_text(source)
    return tmp_path


@pytest.fixture
async def rt(tiny: Path, programs: Path) -> Runtime:
    limits = RuntimeLimits(max_pages_per_instance=24, max_wall_time_s=GENEROUS_WALL_S)
    runtime_ = await start_runtime(tiny, limits=limits, paths=(programs,))
    yield runtime_
    runtime_.check_integrity()
    await runtime_.shutdown(0)


async def test_each_misbehaviour_is_stopped_and_a_neighbour_finishes(rt: Runtime) -> None:
    solo, _ = await launch(rt, *WELL_BEHAVED)
    spinner = await rt.launch("spinner", "{}", username="alice")  # runs throughout; the test stops it at the end
    bad = {"raiser": {}, "page-hog": {},
           **{f"garbage:{k}": {"kind": k} for k in ("short-mask", "negative-run", "empty-logit-mask", "bad-token")}}
    runs = [launch(rt, name.split(":")[0], inputs) for name, inputs in bad.items()]
    *finals, neighbour = await asyncio.gather(*runs, launch(rt, *WELL_BEHAVED))
    assert neighbour[0].kind == "return" and neighbour[0].value == solo.value, neighbour[0]
    errors = dict(zip(bad, (f.value for f, _ in finals), strict=True))
    assert all(f.kind == "error" for f, _ in finals), errors
    assert spinner.status == "running"  # it was beside them all along
    await spinner.terminate("stopped by the test")
    assert (await spinner.wait()).value == "stopped by the test"
    assert "ValueError: bad input 42" in errors["raiser"]
    assert "over its limit of 24" in errors["page-hog"]
    assert "must cover the kv length 3" in errors["garbage:short-mask"]
    assert "negative run length" in errors["garbage:negative-run"]
    assert "logit_mask allows no token" in errors["garbage:empty-logit-mask"]
    assert "outside the model's vocabulary" in errors["garbage:bad-token"]
    assert pages_in_use(rt) == 0  # every failed instance gave its pages back


async def test_the_wall_time_limit_stops_a_spinner(tiny: Path, programs: Path) -> None:
    runtime = await start_runtime(tiny, limits=RuntimeLimits(max_wall_time_s=1.0), paths=(programs,))
    try:
        final, _ = await launch(runtime, "spinner", {})
        assert final.kind == "error" and "wall-time limit of 1 s" in str(final.value), final
    finally:
        await runtime.shutdown(0)


async def test_terminating_a_running_inferlet_frees_it(rt: Runtime) -> None:
    process = await rt.launch("page-hog", "{}", username="alice")
    await wait_for_async(lambda: pages_in_use(rt) >= 8, 30, "the page hog to hold 8 pages")
    await process.terminate("stopped by the test")
    final = await process.wait()
    assert (final.kind, final.value, process.status) == ("error", "stopped by the test", "terminated")
    assert pages_in_use(rt) == 0
    again, _ = await launch(rt, *WELL_BEHAVED)
    assert again.kind == "return"
