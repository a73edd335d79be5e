"""The official `openai` client against `/v1/responses` on a real server (tiny model): instructions,
streaming events, function tools, previous_response_id from a per-user snapshot (the follow-up turn
prefills only its new tokens), and per-key isolation of stored responses."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import pytest_asyncio
from server_support import MODEL, running_server

from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
ADD = {"type": "function", "name": "add", "description": "Add two integers", "strict": True,
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}}
LONG = " ".join(f"word{i}" for i in range(120))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server(api_keys=("alice=sk-alice", "bob=sk-bob")) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def alice(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="sk-alice", max_retries=0) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bob(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="sk-bob", max_retries=0) as client:
        yield client


def _processed(server: Server) -> int:
    assert server.state is not None
    return sum(m.tokens_processed for m in server.state.runtime.models())


async def test_follow_up_turn_reuses_the_snapshot(alice: openai.AsyncOpenAI, bob: openai.AsyncOpenAI,
                                                  server: Server) -> None:
    first = await alice.responses.create(model=MODEL, input=LONG, instructions="Answer briefly.",
                                         max_output_tokens=6, temperature=0)
    assert first.status in ("completed", "incomplete") and first.usage is not None
    assert first.output[0].type == "message"
    before = _processed(server)
    second = await alice.responses.create(model=MODEL, input="And then?", previous_response_id=first.id,
                                          instructions="Answer briefly.", max_output_tokens=4, temperature=0)
    processed = _processed(server) - before
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens - 10
    # Only the new turn (and the unshared tail page) runs through the engine, not the 120-word history.
    assert processed < second.usage.input_tokens // 3, (processed, second.usage.input_tokens)
    assert (await alice.responses.retrieve(first.id)).id == first.id
    with pytest.raises(openai.NotFoundError):
        await bob.responses.create(model=MODEL, input="hi", previous_response_id=first.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await bob.responses.retrieve(first.id)
    assert server.state is not None
    snapshots = server.state.runtime.model(MODEL).snapshots  # type: ignore[attr-defined]
    assert f"pie-{first.id}" in snapshots.names("alice") and not snapshots.names("bob")
    await alice.responses.delete(first.id)
    assert f"pie-{first.id}" not in snapshots.names("alice")


@pytest.mark.parametrize("stream", [False, True])
async def test_function_tool_loop(alice: openai.AsyncOpenAI, stream: bool) -> None:
    first = await _create(alice, stream, model=MODEL, input="What is 2 + 3?", tools=[ADD],
                          tool_choice={"type": "function", "name": "add"}, max_output_tokens=60, temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].arguments), ADD["parameters"])  # type: ignore[union-attr]
    second = await _create(alice, stream, model=MODEL, previous_response_id=first.id, tools=[ADD],
                           tool_choice="none", max_output_tokens=8, temperature=0,
                           input=[{"type": "function_call_output", "call_id": calls[0].call_id,  # type: ignore[union-attr]
                                   "output": "5"}])
    assert second.output[-1].type == "message" and second.status in ("completed", "incomplete")


async def _create(client: openai.AsyncOpenAI, stream: bool, **kwargs: object):  # type: ignore[no-untyped-def]
    if not stream:
        return await client.responses.create(**kwargs)  # type: ignore[call-overload]
    events = [e async for e in await client.responses.create(stream=True, **kwargs)]  # type: ignore[call-overload]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events[-1].response


async def test_json_schema_text_format(alice: openai.AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = await alice.responses.create(model=MODEL, input="Is it?", max_output_tokens=30, temperature=0,
                                         text={"format": {"type": "json_schema", "name": "o", "schema": schema,
                                                          "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), schema)


async def test_refused_parameters(alice: openai.AsyncOpenAI) -> None:
    for kwargs, param in (({"reasoning": {"effort": "low"}}, "reasoning"), ({"background": True}, "background"),
                          ({"truncation": "auto"}, "truncation"), ({"extra_body": {"nope": 1}}, "nope")):
        with pytest.raises(openai.BadRequestError) as caught:
            await alice.responses.create(model=MODEL, input="hi", **kwargs)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param  # type: ignore[index]
