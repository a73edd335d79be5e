"""Anthropic's Messages API: `POST /v1/messages` (plain and streamed) and `/v1/messages/count_tokens`.

A Messages request is translated into the OpenAI-shaped `GenerationRequest` (system prompt, text,
`tool_use` and `tool_result` blocks become system/user/assistant/tool messages; `tools` and
`tool_choice` map onto OpenAI's), so one validation, one prompt renderer and one inferlet serve
both APIs. Errors use Anthropic's `{"type": "error", "error": {type, message}}` shape.

Stop reasons: `end_turn` (the model's end of turn), `max_tokens`, `stop_sequence` (with the one that
matched), `tool_use`. Reasoning from a `<think>` block comes back as a `thinking` content block.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from pie.errors import RequestError
from pie.server.api import auth, generation
from pie.server.api.errors import error_body
from pie.server.api.generation import ChoiceResult, Delta, GenerationFailed, Outcome
from pie.server.api.images import (
    MAX_IMAGES,
    MediaPart,
    check_text,
    decode_base64,
    fetch_images,
    image_url_part,
    marker,
)
from pie.server.api.output import OutputSplitter, Split
from pie.server.api.plan import Plan, build_plan
from pie.server.openai import finish_timer, json_body, served_of, start_timer
from pie.server.openai_schema import GenerationRequest, OpenAIError, common, parse_tools
from pie.server.state import STATE

SUPPORTED = frozenset({"model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p",
                       "top_k", "stream", "tools", "tool_choice", "metadata", "service_tier", "thinking"})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/messages", messages)
    router.add_post("/v1/messages/count_tokens", count_tokens)


def _error(request: web.Request, error: OpenAIError) -> web.Response:
    return web.json_response(error_body(request.path, error.status, str(error)), status=error.status)


def parse_messages(body: Any, *, counting: bool = False) -> GenerationRequest:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    for key, value in body.items():
        if value is not None and key not in SUPPORTED:
            raise OpenAIError(f"{key}: Extra inputs are not permitted (pie does not support `{key}`)", param=key)
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise OpenAIError("`thinking` budgets are not supported; models that think (<think>) return a thinking "
                          "block without it", param="thinking")
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise OpenAIError("`service_tier`: pie has one tier (auto)", param="service_tier")
    if not counting and body.get("max_tokens") is None:
        raise OpenAIError("max_tokens: Field required", param="max_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 1):
        raise OpenAIError(f"temperature: {temperature!r} is not a number from 0 to 1", param="temperature")
    openai_body: dict[str, Any] = {"model": body.get("model"), "temperature": temperature,
                                   "top_p": body.get("top_p"), "top_k": body.get("top_k"),
                                   "stop": body.get("stop_sequences") or None, "stream": body.get("stream"),
                                   "max_tokens": None if counting else body.get("max_tokens")}
    tools, choice, parallel = _tools(body.get("tools"), body.get("tool_choice"))
    images: list[MediaPart] = []
    return GenerationRequest(mode="chat", messages=tuple(_conversation(body, images)),
                             tools=parse_tools(tools, choice, parallel), images=tuple(images),
                             **common(openai_body, tokens_keys=("max_tokens",)))


def _image(block: dict[str, Any], where: str, images: list[MediaPart]) -> str:
    """An image block (source {"type": "base64", "media_type", "data"} or {"type": "url", "url"}) -> its marker."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if not isinstance(source, dict) or kind not in ("base64", "url"):
        raise OpenAIError(f"{where}.source: only base64 and url image sources are taken (got {kind!r})",
                          param=f"{where}.source")
    if len(images) >= MAX_IMAGES:
        raise OpenAIError(f"{where}: more than {MAX_IMAGES} images in one request", param=where)
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise OpenAIError(f"{where}.source.url must be an http(s) URL", param=f"{where}.source.url")
        images.append(image_url_part(url, f"{where}.source.url"))
    else:
        param = f"{where}.source.data"
        images.append(MediaPart(param, decode_base64(source.get("data"), param)))
    return marker(len(images) - 1)


def _tools(tools: Any, choice: Any) -> tuple[Any, Any, Any]:
    if tools is None:
        return None, None, None
    if not isinstance(tools, list):
        raise OpenAIError("tools: must be an array", param="tools")
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            raise OpenAIError(f"tools.{i}: only custom tools with an `input_schema` are supported",
                              param=f"tools.{i}")
        converted.append({"type": "function", "function": {"name": tool.get("name"),
                                                           "description": tool.get("description", ""),
                                                           "parameters": tool["input_schema"]}})
    if choice is None:
        return converted, None, None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise OpenAIError("tool_choice: use {type: auto | any | tool | none}", param="tool_choice")
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice["type"]
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    return converted, mapped, parallel


def _conversation(body: dict[str, Any], images: list[MediaPart]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages: must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise OpenAIError(f"{where}.role: must be user or assistant", param=f"{where}.role")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise OpenAIError(f"{where}.content: a string or an array of content blocks", param=f"{where}.content")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(check_text(str(block.get("text", "")), f"{where}.content.{j}.text"))
            elif kind == "image" and message["role"] == "user":
                texts.append(_image(block, f"{where}.content.{j}", images))
            elif kind == "tool_use" and message["role"] == "assistant":
                calls.append({"id": str(block.get("id", "")), "type": "function",
                              "function": {"name": str(block.get("name")),
                                           "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and message["role"] == "user":
                result = block.get("content", "")
                text = _text(result, f"{where}.content.{j}.content") if result else ""
                out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": f"Error: {text}" if block.get("is_error") else text})
            elif kind in ("thinking", "redacted_thinking") and message["role"] == "assistant":
                continue  # earlier reasoning is not part of the prompt (as chat templates drop it)
            else:
                raise OpenAIError(f"{where}.content.{j}: {kind!r} blocks are not supported on {message['role']} "
                                  "messages (pie takes text, image, tool_use, tool_result)",
                                  param=f"{where}.content.{j}")
        if message["role"] == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "".join(str(b.get("text", "")) for b in value)
    raise OpenAIError(f"{where}: a string or text blocks", param=where)


# -- handlers -------------------------------------------------------------------------------------


async def count_tokens(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        auth.user_of(request)
        req = parse_messages(await json_body(request), counting=True)
        served = served_of(state, req.model)
        plan = build_plan(await fetch_images(req, served, state.options), served)  # images counted as placed
    except OpenAIError as error:
        return _error(request, error)
    return web.json_response({"input_tokens": plan.prompt_tokens})


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        username = auth.user_of(request)
        req = parse_messages(await json_body(request))
        served = served_of(state, req.model)
        plan = build_plan(await fetch_images(req, served, state.options), served)
        process = await generation.launch(state, plan, username)
    except OpenAIError as error:
        return _error(request, error)
    except RequestError as error:
        return _error(request, OpenAIError(str(error), status=503))
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    timer = start_timer(request, plan)
    outcome: Outcome | None = None
    try:
        if req.stream:
            response, outcome = await _stream(request, plan, process, mid, timer)
            return response
        try:
            outcome = await generation.collect(process, timer)
        except GenerationFailed as error:
            return _error(request, OpenAIError(str(error), status=500))
        result = outcome.choices[0]
        split = OutputSplitter(plan.model, parse_tools=plan.parse_tools).whole(result.text, result.tokens)
        return web.json_response(_message(plan, mid, split, result, outcome))
    finally:
        finish_timer(timer, outcome)
        await generation.finished(process)


def stop_reason(result: ChoiceResult, has_calls: bool) -> str:
    if has_calls:
        return "tool_use"
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_string is not None else "end_turn"


def _blocks(split: Split) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if split.reasoning:
        blocks.append({"type": "thinking", "thinking": split.reasoning, "signature": ""})
    if split.content or not split.calls:
        blocks.append({"type": "text", "text": split.content})
    for call in split.calls:
        blocks.append({"type": "tool_use", "id": _tool_id(), "name": call.name, "input": _input(call.arguments)})
    return blocks


def _message(plan: Plan, mid: str, split: Split, result: ChoiceResult, outcome: Outcome) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": plan.request.model,
            "content": _blocks(split), "stop_reason": stop_reason(result, bool(split.calls)),
            "stop_sequence": result.stop_string,
            "usage": {"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens}}


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return {"_raw": arguments}


async def _stream(request: web.Request, plan: Plan, process: Any, mid: str,
                  timer: Any) -> tuple[web.StreamResponse, Outcome | None]:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(kind: str, data: dict[str, Any]) -> None:
        await response.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())

    splitter = OutputSplitter(plan.model, parse_tools=plan.parse_tools)
    index = -1
    open_kind: str | None = None

    async def emit(kind: str, text: str) -> None:
        nonlocal index, open_kind
        block = "thinking" if kind == "reasoning" else "text"
        if open_kind != block:
            if open_kind is not None:
                await send("content_block_stop", {"index": index})
            index += 1
            open_kind = block
            start = {"type": "thinking", "thinking": "", "signature": ""} if block == "thinking" \
                else {"type": "text", "text": ""}
            await send("content_block_start", {"index": index, "content_block": start})
        delta = {"type": "thinking_delta", "thinking": text} if block == "thinking" \
            else {"type": "text_delta", "text": text}
        await send("content_block_delta", {"index": index, "delta": delta})

    await send("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": plan.request.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0}}})
    outcome: Outcome | None = None
    try:
        async for item in generation.run(process, timer):
            if isinstance(item, Delta):
                for kind, text in splitter.push(item.text, item.tokens):
                    await emit(kind, text)
                continue
            outcome = item
            pieces, calls = splitter.finish()
            for kind, text in pieces:
                await emit(kind, text)
            if open_kind is not None:
                await send("content_block_stop", {"index": index})
            for call in calls:
                index += 1
                await send("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": _tool_id(), "name": call.name, "input": {}}})
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": call.arguments}})
                await send("content_block_stop", {"index": index})
            result = item.choices[0]
            await send("message_delta", {"delta": {"stop_reason": stop_reason(result, bool(calls)),
                                                   "stop_sequence": result.stop_string},
                                         "usage": {"output_tokens": item.completion_tokens}})
            await send("message_stop", {})
    except GenerationFailed as error:
        await send("error", {"error": {"type": "api_error", "message": str(error)}})
    await response.write_eof()
    return response, outcome
