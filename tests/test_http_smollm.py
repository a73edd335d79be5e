"""The HTTP APIs on a real small model (SmolLM2-135M-Instruct, see smollm.py) where the text matters:
greedy answers, a two-turn tool loop (call, result, answer), streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import pytest_asyncio
from server_support import running_server
from smollm import smollm_dir  # noqa: F401 (the session fixture)

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(smollm_dir: Path) -> Server:  # noqa: F811
    engine = EngineConfig(model=str(smollm_dir), device="cpu", max_num_kv_pages=512)
    async with running_server(RuntimeConfig((ModelSpec(MODEL, engine),), RuntimeLimits())) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_greedy_answer(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"


# Streamed and not; the streamed loop costs the same again on a 2-core host, so the tiny model covers it
# (test_openai_params.py::test_two_turn_tool_loop_streams).
@pytest.mark.parametrize("stream", [False])
async def test_two_turn_tool_loop(client: openai.AsyncOpenAI, stream: bool) -> None:
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = await _chat(client, stream, messages=messages, tools=[WEATHER], tool_choice="required",
                       parallel_tool_calls=False, max_tokens=40, temperature=0)
    assert call["finish_reason"] == "tool_calls" and len(call["tool_calls"]) == 1
    tool_call = call["tool_calls"][0]
    assert tool_call["function"]["name"] == "get_weather"
    arguments = json.loads(tool_call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    messages += [{"role": "assistant", "content": None, "tool_calls": [tool_call]},
                 {"role": "tool", "tool_call_id": tool_call["id"], "content": "sunny, 24 degrees Celsius"}]
    answer = await _chat(client, stream, messages=messages, tools=[WEATHER], max_tokens=16, temperature=0)
    assert answer["finish_reason"] in ("stop", "length") and not answer["tool_calls"]
    assert answer["content"].strip()


async def _chat(client: openai.AsyncOpenAI, stream: bool, **kwargs: object) -> dict:
    """{content, tool_calls, finish_reason} of one chat completion, streamed or not."""
    if not stream:
        reply = await client.chat.completions.create(model=MODEL, **kwargs)  # type: ignore[call-overload]
        choice = reply.choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return {"content": choice.message.content or "", "tool_calls": calls, "finish_reason": choice.finish_reason}
    chunks = [c async for c in await client.chat.completions.create(model=MODEL, stream=True, **kwargs)]  # type: ignore[call-overload]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc.model_dump(exclude={"index"}) for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    return {"content": content, "tool_calls": calls, "finish_reason": chunks[-1].choices[0].finish_reason}
