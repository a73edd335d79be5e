"""The official `openai` client against the OpenAI-compatible endpoints, served by the `openai-compat`
inferlet on the real runtime."""

from __future__ import annotations

import httpx
import openai
import pytest
import pytest_asyncio
from server_support import MODEL, pages_used, running_server, wait_until

from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_models_lists_the_served_model(client: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in client.models.list()] == [MODEL]


async def test_chat_completion(client: openai.AsyncOpenAI, server: Server) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    again = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == again.choices[0].message.content  # greedy is deterministic
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert pages_used(server) == 0


async def test_chat_completion_streams(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_completion_and_seeded_sampling(client: openai.AsyncOpenAI) -> None:
    runs = [await client.completions.create(model=MODEL, prompt="The cat", max_tokens=8, temperature=0.9,
                                            seed=7) for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text  # same seed, same sample
    streamed = await client.completions.create(model=MODEL, prompt="The cat", max_tokens=8, temperature=0.9,
                                               seed=7, stream=True)
    assert "".join([c.choices[0].text async for c in streamed]) == runs[0].choices[0].text


async def test_stop_sequence_ends_the_text_before_it(client: openai.AsyncOpenAI) -> None:
    free = await client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[3:5]  # something the model is known to produce
    assert stop, f"the greedy text {text!r} is too short to pick a stop string from"
    cut = await client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


async def test_bad_requests_get_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not served here"):
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model=MODEL, messages=[])


async def test_a_client_leaving_mid_stream_terminates_the_inferlet(server: Server) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2000, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:  # noqa: SIM117
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # the first generated text: leave now
    runtime = server.state.runtime  # type: ignore[union-attr]
    process = next(p for p in runtime.processes("openai") if p.started_at == max(
        q.started_at for q in runtime.processes("openai")))
    await wait_until(lambda: process.status != "running", what="the abandoned generation to stop")
    assert process.status == "terminated"
    await wait_until(lambda: pages_used(server) == 0, what="the terminated generation's pages to be freed")
