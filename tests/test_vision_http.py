"""Images over HTTP: the official `openai` client sends a `data:` URL image to a real server on a tiny
random Gemma 3 (and Gemma 4) and gets the tokens the SDK path gives; bad images are 400s that say why, and
the server goes on serving. The Anthropic image block takes the same path. Remote image URLs are fetched
from a real local HTTP server (`image_host`) when `allowed_image_urls` permits them."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from aiohttp import web
from inferlet_helpers import run_sdk
from server_support import running_server
from vision_support import gemma3_checkpoint, gemma4_checkpoint, png

from inferlet import Context, Image, Model, Sampler, chat
from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits
from pie.server.api.images import marker
from pie.server.api.served import served_model
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "gemma3-tiny"
MAX_IMAGE_BYTES = 100_000
FETCH_TIMEOUT_S = 1.0


def _config(ckpt: Path, name: str, max_num_embeds: int) -> RuntimeConfig:
    engine = EngineConfig(model=str(ckpt), device="cpu", max_num_kv_pages=256, kv_page_size=4,
                          max_num_embeds=max_num_embeds, activation_dtype="float32")
    return RuntimeConfig((ModelSpec(name, engine),), RuntimeLimits(max_image_pixels=100 * 100))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def image_host() -> AsyncIterator[str]:
    """A real HTTP server on a free port: /img/ is what the pie server may fetch, /private/ is not."""
    never = asyncio.Event()  # the hanging handler waits on this until teardown

    async def image(request: web.Request) -> web.StreamResponse:
        return web.Response(body=png(int(request.match_info["seed"])), content_type="image/png")

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"\x89PNG" + bytes(2 * MAX_IMAGE_BYTES), content_type="image/png")

    async def hang(request: web.Request) -> web.StreamResponse:
        await never.wait()
        return web.Response(status=204)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/{request.match_info['to']}/11.png")

    async def text(request: web.Request) -> web.StreamResponse:
        return web.Response(text="not an image")

    app = web.Application()
    app.router.add_get("/img/{seed:\\d+}.png", image)
    app.router.add_get("/private/{seed:\\d+}.png", image)
    app.router.add_get("/img/big.png", big)
    app.router.add_get("/img/hang.png", hang)
    app.router.add_get("/img/to/{to}", redirect)
    app.router.add_get("/img/page.html", text)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        never.set()
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory, image_host: str) -> Server:
    ckpt = gemma3_checkpoint(tmp_path_factory.mktemp("gemma3-http"))
    async with running_server(_config(ckpt, MODEL, 64), allowed_image_urls=(f"{image_host}/img/",),
                              max_image_bytes=MAX_IMAGE_BYTES, image_fetch_timeout_s=FETCH_TIMEOUT_S) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gemma4_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    ckpt = gemma4_checkpoint(tmp_path_factory.mktemp("gemma4-http"))
    async with running_server(_config(ckpt, "gemma4-tiny", 128)) as server:
        yield server


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


async def _sdk_text(server: Server, data: bytes, max_tokens: int, name: str = MODEL) -> str:
    """The SDK path: the same rendered prompt, the image appended in its place, greedy generation."""
    assert server.state is not None
    runtime = server.state.runtime
    served = served_model(runtime, name)
    assert served is not None and served.prepare_image is not None
    info = served.prepare_image(data)
    messages = [{"role": "user", "content": "What is this?" + marker(0)}]
    tokens, rows = served.render_chat_images(messages, None, [info])
    # As transformers' processor writes it (Gemma 3: a blank line each side of <start_of_image>...<end_of_image>;
    # Gemma 4: nothing around <boi>...<eoi>).
    before, after = info.text_around
    assert (before, after) == (("\n\n", "\n\n") if name == MODEL else ("", ""))
    assert served.decode(tokens[:rows[0]]).endswith("What is this?" + before)
    assert served.decode(tokens[rows[0] + len(info.tokens):]).startswith(after)

    async def body() -> str:
        model = Model.load(name)
        image = Image.from_bytes(model, data)
        ctx = Context(model)
        ctx.append(tokens[:rows[0]]).buffer_images([image]).append(tokens[rows[0] + image.token_count:])
        out = await ctx.generate(Sampler.argmax(), max_tokens=max_tokens, stop=chat.stop_tokens(model),
                                 auto_flush=False).collect_tokens()
        return model.tokenizer().decode(out)
    return await run_sdk(runtime, body)


async def test_data_url_image_gives_the_sdk_tokens(client: openai.AsyncOpenAI, server: Server) -> None:
    data = png(11)
    reply = await client.chat.completions.create(model=MODEL, messages=_messages(_data_url(data)),  # type: ignore[arg-type]
                                                 max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert text == await _sdk_text(server, data, 6)
    other = await client.chat.completions.create(model=MODEL, messages=_messages(_data_url(png(12))),  # type: ignore[arg-type]
                                                 max_tokens=6, temperature=0)
    assert reply.usage is not None and other.usage is not None
    assert reply.usage.prompt_tokens == other.usage.prompt_tokens  # the same placeholders, other embeddings


async def test_gemma4_data_url_image_gives_the_sdk_tokens(gemma4_server: Server) -> None:
    data = png(11)
    async with openai.AsyncOpenAI(base_url=gemma4_server.http_url + "/v1", api_key="unused",
                                  max_retries=0) as client:
        reply = await client.chat.completions.create(model="gemma4-tiny", messages=_messages(_data_url(data)),  # type: ignore[arg-type]
                                                     max_tokens=6, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens > 65  # the image's 65 tokens and the text
    assert reply.choices[0].message.content == await _sdk_text(gemma4_server, data, 6, "gemma4-tiny")


async def test_bad_images_are_400s_and_the_server_goes_on(client: openai.AsyncOpenAI) -> None:
    cases = [("data:image/png;base64,iVBORw0KGgo=", "cannot be decoded"),
             ("data:image/png;base64,@@not base64@@", "not valid base64"),
             ("https://example.com/cat.png", "matches no prefix of \\[server\\] allowed_image_urls"),
             ("data:image/png;base64," + base64.b64encode(bytes(MAX_IMAGE_BYTES + 1)).decode(),
              "over \\[server\\] max_image_bytes"),
             (_data_url(png(13, (120, 120))), "over the limit of 10000")]
    for url, why in cases:
        with pytest.raises(openai.BadRequestError, match=why):
            await client.chat.completions.create(model=MODEL, messages=_messages(url), max_tokens=2)  # type: ignore[arg-type]
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png(20 + i))}}
                                         for i in range(17)]}]  # 17 x 4 rows > max_num_embeds = 64
    with pytest.raises(openai.BadRequestError, match="68 embedding rows, over the model's max_num_embeds = 64"):
        await client.chat.completions.create(model=MODEL, messages=many, max_tokens=2)  # type: ignore[arg-type]
    ok = await client.chat.completions.create(model=MODEL, messages=_messages(_data_url(png(14))), max_tokens=2)  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason in ("stop", "length")


async def test_anthropic_image_block(server: Server) -> None:
    data = png(11)
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(data).decode()}}]}]}
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        reply = await http.post("/v1/messages", json=body)
        bad = await http.post("/v1/messages", json={**body, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["content"][0]["text"] == await _sdk_text(server, data, 6)
    assert bad.status_code == 400 and "allowed_image_urls" in bad.text


async def test_a_text_model_refuses_images(tmp_path: Path) -> None:
    async with running_server() as text_server, openai.AsyncOpenAI(
            base_url=text_server.http_url + "/v1", api_key="unused", max_retries=0) as text_client:
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[1\]\.image_url\.url: model "
                           "'pie/tiny-random' serves text only"):
            await text_client.chat.completions.create(model="pie/tiny-random", messages=_messages(_data_url(png(1))),  # type: ignore[arg-type]
                                                      max_tokens=2)
        data = base64.b64encode(png(1)).decode()
        routes = [  # the same refusal on every route that takes images, each naming its own part
            ("/v1/messages", {"model": "pie/tiny-random", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}),
            ("/v1/responses", {"model": "pie/tiny-random", "max_output_tokens": 2, "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": _data_url(png(1))}]}]}),
            ("/v1beta/models/pie/tiny-random:generateContent", {"contents": [{"role": "user", "parts": [
                {"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": data}}]}]})]
        async with httpx.AsyncClient(base_url=text_server.http_url) as http:
            for path, body in routes:
                reply = await http.post(path, json=body)
                assert reply.status_code == 400 and "serves text only" in reply.text, (path, reply.text)
        ok = await text_client.chat.completions.create(model="pie/tiny-random", max_tokens=2,
                                                       messages=[{"role": "user", "content": "Hi"}])
        assert ok.choices[0].message.content is not None


async def test_allowed_remote_url_gives_the_data_url_tokens(client: openai.AsyncOpenAI, image_host: str) -> None:
    replies = [await client.chat.completions.create(model=MODEL, messages=_messages(url),  # type: ignore[arg-type]
                                                    max_tokens=6, temperature=0)
               for url in (f"{image_host}/img/11.png", _data_url(png(11)))]
    assert replies[0].usage == replies[1].usage
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


async def test_refused_remote_urls_are_400s_naming_the_part(client: openai.AsyncOpenAI, image_host: str) -> None:
    part = r"messages\[0\]\.content\[1\]\.image_url\.url: .*"
    cases = [(f"{image_host}/private/11.png", "matches no prefix of \\[server\\] allowed_image_urls"),
             (f"{image_host}/img/big.png", "over \\[server\\] max_image_bytes = 100000"),
             (f"{image_host}/img/hang.png", f"took over \\[server\\] image_fetch_timeout_s = {FETCH_TIMEOUT_S}"),
             (f"{image_host}/img/to/private", "redirects to .*/private/11.png, which \\[server\\] allowed_image_urls"),
             (f"{image_host}/img/page.html", "serves 'text/plain', not an image"),
             (f"{image_host}/img/missing.png", "answered HTTP 404")]
    for url, why in cases:
        with pytest.raises(openai.BadRequestError, match=part + why):
            await client.chat.completions.create(model=MODEL, messages=_messages(url), max_tokens=2)  # type: ignore[arg-type]
    followed = await client.chat.completions.create(model=MODEL, messages=_messages(f"{image_host}/img/to/img"),  # type: ignore[arg-type]
                                                    max_tokens=2)  # a redirect within the allow-list is followed
    assert followed.choices[0].finish_reason in ("stop", "length")


async def test_anthropic_url_source_and_count_tokens(server: Server, image_host: str) -> None:
    import anthropic

    data = png(11)
    sources = [{"type": "url", "url": f"{image_host}/img/11.png"},
               {"type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()}]
    async with anthropic.AsyncAnthropic(base_url=server.http_url, api_key="unused", max_retries=0) as claude:
        texts, counts = [], []
        for source in sources:
            messages: Any = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                          {"type": "image", "source": source}]}]
            reply = await claude.messages.create(model=MODEL, max_tokens=6, messages=messages,
                                                 extra_body={"temperature": 0})  # this client takes no temperature
            count = await claude.messages.count_tokens(model=MODEL, messages=messages)
            texts.append(reply.content[0].text)  # type: ignore[union-attr]
            counts.append((count.input_tokens, reply.usage.input_tokens))
        text_only = await claude.messages.count_tokens(model=MODEL, messages=[
            {"role": "user", "content": "What is this?"}])
    assert texts[0] == texts[1] == await _sdk_text(server, data, 6)
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    assert counts[0][0] > text_only.input_tokens + 4  # the image's placeholder tokens are counted


async def test_responses_input_image_gives_the_chat_tokens(client: openai.AsyncOpenAI, image_host: str) -> None:
    chat_reply = await client.chat.completions.create(model=MODEL, messages=_messages(_data_url(png(11))),  # type: ignore[arg-type]
                                                      max_tokens=6, temperature=0)
    for url in (_data_url(png(11)), f"{image_host}/img/11.png"):
        reply = await client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, store=False, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": url, "detail": "auto"}]}])
        assert reply.output_text == chat_reply.choices[0].message.content
        assert reply.usage is not None and chat_reply.usage is not None
        assert reply.usage.input_tokens == chat_reply.usage.prompt_tokens
    bad = [({"type": "input_image", "file_id": "file-abc", "detail": "auto"}, r"input\[0\]\.content\[0\]\.file_id: pie has no Files API"),
           ({"type": "input_image", "image_url": f"{image_host}/private/11.png", "detail": "auto"},
            r"input\[0\]\.content\[0\]\.image_url: .*allowed_image_urls")]
    for part, why in bad:
        with pytest.raises(openai.BadRequestError, match=why):
            await client.responses.create(model=MODEL, max_output_tokens=2, store=False,
                                          input=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
    ok = await client.responses.create(model=MODEL, max_output_tokens=2, store=False, input="Hi")
    assert ok.status == "completed" or ok.status == "incomplete"


async def test_gemini_inline_and_file_data(client: openai.AsyncOpenAI, server: Server, image_host: str) -> None:
    chat_reply = await client.chat.completions.create(model=MODEL, messages=_messages(_data_url(png(11))),  # type: ignore[arg-type]
                                                      max_tokens=6, temperature=0)
    images = [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png(11)).decode()}},
              {"fileData": {"mimeType": "image/png", "fileUri": f"{image_host}/img/11.png"}}]
    config = {"maxOutputTokens": 6, "temperature": 0}
    path = f"/v1beta/models/{MODEL}"
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for image in images:
            body = {"contents": [{"role": "user", "parts": [{"text": "What is this?"}, image]}]}
            reply = await http.post(f"{path}:generateContent", json={**body, "generationConfig": config})
            assert reply.status_code == 200, reply.text
            assert reply.json()["candidates"][0]["content"]["parts"][0]["text"] == chat_reply.choices[0].message.content
            count = await http.post(f"{path}:countTokens", json=body)
            assert chat_reply.usage is not None and count.json()["totalTokens"] == chat_reply.usage.prompt_tokens
        refused = await http.post(f"{path}:generateContent", json={"contents": [{"role": "user", "parts": [
            {"fileData": {"fileUri": f"{image_host}/private/11.png"}}]}]})
        assert refused.status_code == 400 and "contents[0].parts[0].fileData.fileUri" in refused.text
        ok = await http.post(f"{path}:generateContent", json={"contents": [{"parts": [{"text": "Hi"}]}],
                                                       "generationConfig": {"maxOutputTokens": 2}})
        assert ok.status_code == 200
