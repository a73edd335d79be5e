"""Gemini's generateContent / streamGenerateContent / countTokens on a real server with SmolLM2
(smollm.py), over plain httpx (the google SDK is not a dependency): the same greedy answer as chat
completions, streamed as SSE and as a JSON array, candidateCount, JSON output under a responseSchema,
a forced function call with a functionResponse turn after it, and Gemini-shaped 400s naming fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
from server_support import running_server
from smollm import smollm_dir  # noqa: F401 (the session fixture)

from pie.engine.config import EngineConfig
from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits
from pie.server.api.gemini import openapi_to_json_schema
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "smollm2"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
FRANCE = [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]
GREEDY = {"temperature": 0, "maxOutputTokens": 16}
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING", "maxLength": 30}},
                          "required": ["city"]}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(smollm_dir: Path) -> Server:  # noqa: F811
    engine = EngineConfig(model=str(smollm_dir), device="cpu", max_num_kv_pages=512)
    async with running_server(RuntimeConfig((ModelSpec(MODEL, engine),), RuntimeLimits())) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=300) as client:
        yield client


def _text(candidate: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in candidate["content"]["parts"] if not p.get("thought"))


async def test_generate_matches_chat_completions(client: httpx.AsyncClient) -> None:
    reply = await client.post(GENERATE, json={"contents": FRANCE, "generationConfig": GREEDY})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    candidate = body["candidates"][0]
    assert candidate["content"]["role"] == "model" and candidate["finishReason"] == "STOP"
    assert _text(candidate) == "The capital of France is Paris."
    usage = body["usageMetadata"]
    chat = (await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0})).json()
    assert usage["promptTokenCount"] == chat["usage"]["prompt_tokens"]
    assert usage["candidatesTokenCount"] == chat["usage"]["completion_tokens"]
    count = await client.post(f"/v1beta/models/{MODEL}:countTokens", json={"contents": FRANCE})
    assert count.json() == {"totalTokens": usage["promptTokenCount"]}


async def test_stream_matches_whole(client: httpx.AsyncClient) -> None:
    body = {"contents": FRANCE, "systemInstruction": {"parts": [{"text": "Answer in one sentence."}]},
            "generationConfig": {**GREEDY, "maxOutputTokens": 6}}
    whole = (await client.post(GENERATE, json=body)).json()
    for sse in (True, False):
        url = f"/v1beta/models/{MODEL}:streamGenerateContent" + ("?alt=sse" if sse else "")
        reply = await client.post(url, json=body)
        assert reply.status_code == 200, reply.text
        if sse:
            assert reply.headers["content-type"].startswith("text/event-stream")
            chunks = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
                      if line.startswith("data: ")]
        else:
            chunks = json.loads(reply.text)  # one JSON array, written as it grew
        assert len(chunks) > 1
        assert "".join(_text(c["candidates"][0]) for c in chunks) == _text(whole["candidates"][0])
        assert chunks[-1]["candidates"][0]["finishReason"] == whole["candidates"][0]["finishReason"]
        assert chunks[-1]["usageMetadata"] == whole["usageMetadata"]


async def test_candidate_count(client: httpx.AsyncClient) -> None:
    reply = await client.post(GENERATE, json={"contents": FRANCE, "generationConfig": {
        "candidateCount": 2, "maxOutputTokens": 2, "temperature": 1.0, "topK": 40, "topP": 0.9, "seed": 1}})
    assert reply.status_code == 200, reply.text
    assert [c["index"] for c in reply.json()["candidates"]] == [0, 1]


async def test_response_schema_output_parses(client: httpx.AsyncClient) -> None:
    schema = {"type": "OBJECT", "properties": {"city": {"type": "STRING", "maxLength": 20},
                                               "capital": {"type": "BOOLEAN", "nullable": True}},
              "required": ["city", "capital"], "propertyOrdering": ["city", "capital"]}
    reply = await client.post(GENERATE, json={"contents": FRANCE, "generationConfig": {
        "temperature": 0, "maxOutputTokens": 24, "responseMimeType": "application/json", "responseSchema": schema}})
    assert reply.status_code == 200, reply.text
    value = json.loads(_text(reply.json()["candidates"][0]))
    jsonschema.validate(value, openapi_to_json_schema(schema, "schema"))


async def test_forced_function_call_then_response(client: httpx.AsyncClient) -> None:
    contents: list[dict[str, Any]] = [{"role": "user", "parts": [{"text": "What is the weather in Paris?"}]}]
    tools = [{"functionDeclarations": [WEATHER]}]
    forced = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    reply = await client.post(GENERATE, json={"contents": contents, "tools": tools, "toolConfig": forced,
                                              "generationConfig": {"temperature": 0, "maxOutputTokens": 28}})
    assert reply.status_code == 200, reply.text
    parts = reply.json()["candidates"][0]["content"]["parts"]
    call = next(p["functionCall"] for p in parts if "functionCall" in p)
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], openapi_to_json_schema(WEATHER["parameters"], "parameters"))
    contents += [{"role": "model", "parts": [{"functionCall": call}]},
                 {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                                  "response": {"weather": "sunny, 21 C"}}}]}]
    answer = await client.post(GENERATE, json={"contents": contents, "tools": tools,
                                               "generationConfig": {"temperature": 0, "maxOutputTokens": 3}})
    assert answer.status_code == 200, answer.text
    assert _text(answer.json()["candidates"][0])


@pytest.mark.parametrize(("body", "field"), [
    ({"contents": FRANCE, "cachedContent": "x"}, "cachedContent"),
    ({"contents": FRANCE, "generationConfig": {"responseLogprobs": True}}, "generationConfig.responseLogprobs"),
    ({"contents": FRANCE, "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}}},
     "generationConfig.thinkingConfig"),
    ({"contents": FRANCE, "generationConfig": {"responseMimeType": "text/x.enum"}},
     "generationConfig.responseMimeType"),
    ({"contents": FRANCE, "generationConfig": {"temperature": 3}}, "temperature"),
    # an empty inline image: refused at parsing, naming its data
    ({"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": ""}}]}]},
     "contents[0].parts[0].inlineData.data"),
    ({"contents": FRANCE, "tools": [{"googleSearch": {}}]}, "tools[0].googleSearch"),
])
async def test_unsupported_fields_are_400s_naming_them(client: httpx.AsyncClient, body: dict[str, Any],
                                                       field: str) -> None:
    reply = await client.post(GENERATE, json=body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["details"][0]["fieldViolations"][0]["field"] == field


async def test_unknown_model_and_method(client: httpx.AsyncClient) -> None:
    missing = await client.post("/v1beta/models/nope:generateContent", json={"contents": FRANCE})
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    method = await client.post(f"/v1beta/models/{MODEL}:embedContent", json={})
    assert method.status_code == 404 and "embedContent" in method.json()["error"]["message"]
    listing = (await client.get("/v1beta/models")).json()
    assert [m["name"] for m in listing["models"]] == [f"models/{MODEL}"]
    assert listing["models"][0]["inputTokenLimit"] > 0
