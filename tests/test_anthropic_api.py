"""The official `anthropic` client against `/v1/messages` on a real server (tiny model): shapes, stop
reasons, streaming events, tools and tool results, count_tokens, and Anthropic-shaped errors."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
import pytest_asyncio
from server_support import MODEL, running_server

from pie.server.api.served import served_model
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
HELLO = [{"role": "user", "content": "Hello"}]
GREEDY = {"temperature": 0}  # this client version sends sampling parameters only as extra_body
ADD = {"name": "add", "description": "Add two integers",
       "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["a", "b"], "additionalProperties": False}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> anthropic.AsyncAnthropic:
    async with anthropic.AsyncAnthropic(base_url=server.http_url, api_key="unused", max_retries=0) as client:
        yield client


async def test_message_and_stop_reasons(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO, extra_body=GREEDY,  # type: ignore[arg-type]
                                           system="Be brief.")
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "text"
    assert message.stop_reason in ("max_tokens", "end_turn") and message.usage.output_tokens <= 5
    text = message.content[0].text  # type: ignore[union-attr]
    if message.stop_reason == "max_tokens" and len(text) > 3:
        stop = text[1:3]
        cut = await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO, extra_body=GREEDY,  # type: ignore[arg-type]
                                           system="Be brief.", stop_sequences=[stop])
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
        assert cut.content[0].text == text[:text.index(stop)]  # type: ignore[union-attr]


async def test_streamed_message_matches(client: anthropic.AsyncAnthropic) -> None:
    whole = await client.messages.create(model=MODEL, max_tokens=6, messages=HELLO, extra_body=GREEDY)  # type: ignore[arg-type]
    async with client.messages.stream(model=MODEL, max_tokens=6, messages=HELLO, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_loop(client: anthropic.AsyncAnthropic, stream: bool) -> None:
    messages: list[dict] = [{"role": "user", "content": "What is 2 + 3?"}]
    kwargs = {"model": MODEL, "max_tokens": 80, "tools": [ADD], "extra_body": GREEDY}
    first = await _create(client, stream, messages=messages, tool_choice={"type": "tool", "name": "add"}, **kwargs)
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "add"  # type: ignore[union-attr]
    jsonschema.validate(use.input, ADD["input_schema"])  # type: ignore[union-attr]
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "5"}]}]  # type: ignore[union-attr]
    second = await _create(client, stream, messages=messages, tool_choice={"type": "none"}, **kwargs)
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].type == "text"


async def _create(client: anthropic.AsyncAnthropic, stream: bool, **kwargs: object) -> anthropic.types.Message:
    if not stream:
        return await client.messages.create(**kwargs)  # type: ignore[call-overload, no-any-return]
    async with client.messages.stream(**kwargs) as events:  # type: ignore[arg-type]
        return await events.get_final_message()


async def test_count_tokens_matches_the_prompt(client: anthropic.AsyncAnthropic, server: Server) -> None:
    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO, system="Be brief.")  # type: ignore[arg-type]
    assert server.state is not None
    served = served_model(server.state.runtime, MODEL)
    assert served is not None
    expected = served.render_chat([{"role": "system", "content": "Be brief."}, *HELLO], None)
    assert counted.input_tokens == len(expected)
    message = await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO, system="Be brief.")  # type: ignore[arg-type]
    assert message.usage.input_tokens == counted.input_tokens


async def test_errors_are_anthropic_shaped(client: anthropic.AsyncAnthropic, server: Server) -> None:
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        await client.messages.create(model=MODEL, max_tokens=5, messages=HELLO, extra_body={"temperature": 1.5})  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="image"):
        await client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [  # type: ignore[list-item]
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="claude-x", max_tokens=5, messages=HELLO)  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.post("/v1/messages", json={"model": MODEL, "messages": HELLO})
        wrong = await http.get("/v1/messages")
    assert response.status_code == 400 and response.json()["type"] == "error"
    assert response.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert wrong.status_code == 405 and wrong.json()["type"] == "error"
    assert json.dumps(wrong.json()).find("Traceback") < 0
