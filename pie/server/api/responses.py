"""OpenAI's Responses API: `POST /v1/responses` (plain and streamed), `GET`/`DELETE /v1/responses/{id}`.

A Responses request becomes the same `GenerationRequest` as a chat completion: `instructions` is the
system message, `input` items (messages, `function_call`, `function_call_output`) are the
conversation, `text.format` is `response_format`, function `tools` are chat tools.

`previous_response_id` continues a stored conversation. A stored response (`store`, the default)
keeps its conversation (messages, without the instructions, as OpenAI's API does) and a snapshot
of the context the inferlet generated in, in the user's namespace. The snapshot pins those KV pages,
so the follow-up turn, rendered as the whole conversation, finds them in the prefix cache and only
the new turn is prefilled. Stored responses are per user (another API key cannot see them), at most
`MAX_STORED_PER_USER` each, and dropped with their snapshot after `STORE_TTL_S`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pie.errors import PieError, RequestError
from pie.server.api import auth, generation
from pie.server.api.generation import Delta, GenerationFailed, Outcome
from pie.server.api.images import (
    MAX_IMAGES,
    MediaPart,
    check_text,
    fetch_images,
    image_url_part,
    marker,
    split_markers,
)
from pie.server.api.output import OutputSplitter, Split
from pie.server.api.plan import Plan, build_plan
from pie.server.openai import finish_timer, json_body, served_of, start_timer
from pie.server.openai_schema import (
    GenerationRequest,
    OpenAIError,
    common,
    parse_response_format,
    parse_tools,
)
from pie.server.state import STATE, ServerState

log = logging.getLogger("pie.server.api")
STORE_TTL_S = 600.0  # a stored response pins KV pages: keep them for a conversation's pace, not for days
MAX_STORED_PER_USER = 16
SUPPORTED = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                       "tools", "tool_choice", "parallel_tool_calls", "previous_response_id", "store", "text",
                       "metadata", "user", "truncation", "service_tier", "prompt_cache_key", "safety_identifier",
                       "top_k", "min_p", "seed", "stream_options"})
REFUSED = {"reasoning": "the served models take no reasoning options", "include": "no extra output data",
           "background": "background responses are not supported", "max_tool_calls": "not supported",
           "top_logprobs": "logprobs are served by /v1/chat/completions", "conversation": "use previous_response_id",
           "prompt": "stored prompts are not supported"}


@dataclass
class Stored:
    model: str
    messages: list[dict[str, Any]]  # the conversation including this response's output
    snapshot: str | None
    expires: float
    body: dict[str, Any]  # the response object (GET /v1/responses/{id})


STORE = web.AppKey("responses_store", dict)  # user -> OrderedDict[response id, Stored]


def add_routes(app: web.Application) -> None:
    app[STORE] = {}
    app.router.add_post("/v1/responses", create)
    app.router.add_get("/v1/responses/{response_id}", retrieve)
    app.router.add_delete("/v1/responses/{response_id}", delete)


def _error(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _user_store(request: web.Request, user: str) -> OrderedDict[str, Stored]:
    """The user's stored responses, after dropping every user's expired ones (and their snapshots)."""
    stores: dict[str, OrderedDict[str, Stored]] = request.app[STORE]
    now = time.monotonic()
    for owner, entries in stores.items():
        for rid in [rid for rid, s in entries.items() if s.expires < now]:
            _drop(request.app[STATE], owner, entries.pop(rid))
    return stores.setdefault(user, OrderedDict())


def _drop(state: ServerState, user: str, stored: Stored) -> None:
    if stored.snapshot is None:
        return
    model_of = getattr(state.runtime, "model", None)
    try:
        if model_of is not None:
            model_of(stored.model).snapshots.delete(user, stored.snapshot)
    except (PieError, KeyError) as error:  # already gone (the runtime restarted its store, ...)
        log.debug("snapshot %s of %s was already gone: %s", stored.snapshot, user, error)


def _lookup(request: web.Request, user: str, rid: str) -> Stored:
    stored = _user_store(request, user).get(rid)
    if stored is None:
        raise OpenAIError(f"Previous response with id '{rid}' not found (responses are kept per API key for "
                          f"{STORE_TTL_S:g} s when store is true)", status=404, param="previous_response_id",
                          code="previous_response_not_found")
    return stored


# -- request --------------------------------------------------------------------------------------


def parse_response_request(body: Any, history: list[dict[str, Any]]) -> GenerationRequest:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    for key, value in body.items():
        if value is None or key in SUPPORTED:
            continue
        if key in REFUSED:
            raise OpenAIError(f"`{key}` is not supported: {REFUSED[key]}", param=key, code="unsupported_parameter")
        raise OpenAIError(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise OpenAIError("`truncation` 'auto' is not supported: a too-long conversation is a 400",
                          param="truncation")
    if any(split_markers(str(m.get("content") or ""))[1:] for m in history):
        raise OpenAIError("`previous_response_id` names a response whose input had images; pie keeps no images "
                          "between responses: send the whole conversation as `input`", param="previous_response_id")
    messages = list(history)
    if body.get("instructions"):
        if not isinstance(body["instructions"], str):
            raise OpenAIError("`instructions` must be a string", param="instructions")
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    images: list[MediaPart] = []
    messages += _input_items(body.get("input"), images)
    text = body.get("text") or {}
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise OpenAIError("`text` takes {format: {type: text | json_object | json_schema}}", param="text")
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                      "strict": fmt.get("strict")}}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise OpenAIError("`tools` must be an array", param="tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise OpenAIError(f"tools[{i}] is of type {tool.get('type') if isinstance(tool, dict) else None!r};"
                                  " only function tools are supported", param=f"tools[{i}].type")
            converted.append({"type": "function", "function": {k: tool.get(k) for k in
                                                               ("name", "description", "parameters")}})
        tools = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    openai_body = {k: body.get(k) for k in ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stream",
                                            "stream_options")}
    openai_body["max_tokens"] = body.get("max_output_tokens")
    return GenerationRequest(mode="chat", messages=tuple(messages), tools=parse_tools(tools, choice,
                                                                                       body.get("parallel_tool_calls")),
                             json_schema=parse_response_format(fmt) if fmt is not None else None,
                             images=tuple(images),
                             **{**common(openai_body, tokens_keys=("max_tokens",)),
                                "max_tokens_param": "max_output_tokens"})


def _input_items(value: Any, images: list[MediaPart]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise OpenAIError("`input` must be a string or a non-empty array of input items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise OpenAIError(f"{where}.role must be user, assistant, system or developer", param=f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _content(item.get("content"), f"{where}.content",
                                            images if role == "user" else None)})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", "{}"))}}
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not part of the prompt
        else:
            raise OpenAIError(f"{where} is a {kind!r} item; pie takes message, function_call and "
                              "function_call_output items", param=where)
    return out


def _content(content: Any, where: str, images: list[MediaPart] | None = None) -> str:
    """A message's text; with `images` (user messages), `input_image` parts are taken and marked in it."""
    if isinstance(content, str):
        return check_text(content, where) if images is not None else content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            here = f"{where}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, dict) and kind in ("input_text", "output_text", "text"):
                text = str(part.get("text", ""))
                parts.append(check_text(text, here) if images is not None else text)
            elif isinstance(part, dict) and kind == "input_image" and images is not None:
                parts.append(_image(part, here, images))
            else:
                allowed = "input_text and input_image parts" if images is not None else "text"
                raise OpenAIError(f"{here} is a {kind!r} part: only {allowed} are supported", param=here)
        return "".join(parts)
    raise OpenAIError(f"{where} must be a string or text parts", param=where)


def _image(part: dict[str, Any], where: str, images: list[MediaPart]) -> str:
    """An `input_image` part ({image_url: data: or http(s) URL}) -> its marker; file_id images are refused."""
    if part.get("file_id") is not None:
        raise OpenAIError(f"{where}.file_id: pie has no Files API; send the image as image_url (a data: URL or an "
                          "allowed http(s) URL)", param=f"{where}.file_id")
    if len(images) >= MAX_IMAGES:
        raise OpenAIError(f"{where}: more than {MAX_IMAGES} images in one request", param=where)
    images.append(image_url_part(part.get("image_url"), f"{where}.image_url"))
    return marker(len(images) - 1)


# -- handlers -------------------------------------------------------------------------------------


async def retrieve(request: web.Request) -> web.Response:
    try:
        stored = _lookup(request, auth.user_of(request), request.match_info["response_id"])
    except OpenAIError as error:
        return _error(error)
    return web.json_response(stored.body)


async def delete(request: web.Request) -> web.Response:
    try:
        user = auth.user_of(request)
        rid = request.match_info["response_id"]
        _lookup(request, user, rid)
    except OpenAIError as error:
        return _error(error)
    _drop(request.app[STATE], user, _user_store(request, user).pop(rid))
    return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})


async def create(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rid = f"resp_{uuid.uuid4().hex[:24]}"
    try:
        user = auth.user_of(request)
        body = await json_body(request)
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        history = list(_lookup(request, user, previous).messages) if previous else []
        req = parse_response_request(body, history)
        store = body.get("store", True) is not False
        served = served_of(state, req.model)
        req = await fetch_images(req, served, state.options)
        plan = build_plan(req, served, save=f"pie-{rid}" if store else None)
        process = await generation.launch(state, plan, user)
    except OpenAIError as error:
        return _error(error)
    except RequestError as error:
        return _error(OpenAIError(str(error), status=503, kind="server_error"))
    timer = start_timer(request, plan)
    outcome: Outcome | None = None
    shape = _Shape(plan, rid, body)
    try:
        if req.stream:
            response, outcome = await _stream(request, plan, process, shape, timer)
        else:
            try:
                outcome = await generation.collect(process, timer)
            except GenerationFailed as error:
                return _error(OpenAIError(str(error), status=500, kind="server_error"))
            first = outcome.choices[0]
            split = OutputSplitter(plan.model, parse_tools=plan.parse_tools).whole(first.text, first.tokens)
            response = web.json_response(shape.response(split, outcome))
        if outcome is not None and store:
            _remember(request, user, rid, plan, shape, outcome)
        return response
    finally:
        finish_timer(timer, outcome)
        await generation.finished(process)


def _remember(request: web.Request, user: str, rid: str, plan: Plan, shape: _Shape, outcome: Outcome) -> None:
    store = _user_store(request, user)
    # Instructions are per request (OpenAI's rule): the stored conversation starts after them.
    messages = list(plan.request.messages)[1 if shape.body.get("instructions") else 0:]
    split = shape.last_split
    assistant: dict[str, Any] = {"role": "assistant", "content": split.content if split else ""}
    if shape.calls:
        assistant["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]}}
                                   for c in shape.calls]
    store[rid] = Stored(plan.request.model, [*messages, assistant], plan.save, time.monotonic() + STORE_TTL_S,
                        shape.response_body or {})
    while len(store) > MAX_STORED_PER_USER:
        _, oldest = store.popitem(last=False)
        _drop(request.app[STATE], user, oldest)


class _Shape:
    """The response object and its output items, shared by the plain and streamed paths."""

    def __init__(self, plan: Plan, rid: str, body: dict[str, Any]) -> None:
        self.plan, self.rid, self.body = plan, rid, body
        self.created = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.calls: list[dict[str, Any]] = []
        self.last_split: Split | None = None
        self.response_body: dict[str, Any] | None = None

    def envelope(self, status: str, output: list[dict[str, Any]], outcome: Outcome | None) -> dict[str, Any]:
        req = self.plan.request
        incomplete = outcome is not None and outcome.choices[0].finish_reason == "length" and not self.calls
        usage = None
        if outcome is not None:
            usage = {"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens,
                     "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
                     "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        fmt = (self.body.get("text") or {}).get("format") or {"type": "text"}
        return {"id": self.rid, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete and status == "completed" else status,
                "model": req.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": self.body.get("instructions"), "metadata": self.body.get("metadata") or {},
                "previous_response_id": self.body.get("previous_response_id"),
                "max_output_tokens": self.body.get("max_output_tokens"),
                "temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
                "parallel_tool_calls": req.tools.parallel if req.tools else True,
                "tool_choice": self.body.get("tool_choice") or "auto", "tools": self.body.get("tools") or [],
                "text": {"format": fmt}, "truncation": "disabled", "store": self.body.get("store", True) is not False}

    def message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed"
                else []}

    def call_item(self, name: str, arguments: str) -> dict[str, Any]:
        call = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}",
                "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments": arguments,
                "status": "completed"}
        self.calls.append(call)
        return call

    def reasoning_item(self, text: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def response(self, split: Split, outcome: Outcome) -> dict[str, Any]:
        self.last_split = split
        output: list[dict[str, Any]] = []
        if split.reasoning:
            output.append(self.reasoning_item(split.reasoning))
        if split.content or not split.calls:
            output.append(self.message_item(split.content))
        output += [self.call_item(c.name, c.arguments) for c in split.calls]
        self.response_body = self.envelope("completed", output, outcome)
        return self.response_body


async def _stream(request: web.Request, plan: Plan, process: Any, shape: _Shape,
                  timer: Any) -> tuple[web.StreamResponse, Outcome | None]:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    sequence = 0

    async def send(kind: str, data: dict[str, Any]) -> None:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **data}
        sequence += 1
        await response.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

    await send("response.created", {"response": shape.envelope("in_progress", [], None)})
    await send("response.in_progress", {"response": shape.envelope("in_progress", [], None)})
    splitter = OutputSplitter(plan.model, parse_tools=plan.parse_tools)
    text = ""
    opened = False

    async def content(piece: str) -> None:
        nonlocal text, opened
        if not opened:
            opened = True
            await send("response.output_item.added", {"output_index": 0, "item": shape.message_item("", "in_progress")})
            await send("response.content_part.added", {"item_id": shape.message_id, "output_index": 0,
                                                       "content_index": 0,
                                                       "part": {"type": "output_text", "text": "", "annotations": []}})
        text += piece
        await send("response.output_text.delta", {"item_id": shape.message_id, "output_index": 0, "content_index": 0,
                                                  "delta": piece, "logprobs": []})

    outcome: Outcome | None = None
    reasoning = ""
    try:
        async for item in generation.run(process, timer):
            if isinstance(item, Delta):
                for kind, piece in splitter.push(item.text, item.tokens):
                    if kind == "reasoning":
                        reasoning += piece
                    else:
                        await content(piece)
                continue
            outcome = item
            pieces, calls = splitter.finish()
            for kind, piece in pieces:
                if kind == "reasoning":
                    reasoning += piece
                else:
                    await content(piece)
            if not opened and not calls:
                await content("")
            output: list[dict[str, Any]] = []
            if reasoning:
                output.append(shape.reasoning_item(reasoning))
            if opened:
                await send("response.output_text.done", {"item_id": shape.message_id, "output_index": 0,
                                                         "content_index": 0, "text": text, "logprobs": []})
                part = {"type": "output_text", "text": text, "annotations": []}
                await send("response.content_part.done", {"item_id": shape.message_id, "output_index": 0,
                                                          "content_index": 0, "part": part})
                done = shape.message_item(text)
                await send("response.output_item.done", {"output_index": 0, "item": done})
                output.append(done)
            for call in calls:
                index = len(output)
                item_done = shape.call_item(call.name, call.arguments)
                await send("response.output_item.added", {"output_index": index,
                                                          "item": {**item_done, "arguments": "",
                                                                   "status": "in_progress"}})
                await send("response.function_call_arguments.delta", {"item_id": item_done["id"],
                                                                      "output_index": index,
                                                                      "delta": call.arguments})
                await send("response.function_call_arguments.done", {"item_id": item_done["id"],
                                                                     "output_index": index,
                                                                     "arguments": call.arguments})
                await send("response.output_item.done", {"output_index": index, "item": item_done})
                output.append(item_done)
            shape.last_split = Split(reasoning, text, calls)
            shape.response_body = shape.envelope("completed", output, item)
            await send("response.completed", {"response": shape.response_body})
    except GenerationFailed as error:
        await send("response.failed", {"response": {**shape.envelope("failed", [], None),
                                                    "error": {"code": "server_error", "message": str(error)}}})
    await response.write_eof()
    return response, outcome
