"""Google's Gemini API: `POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent`
(`?alt=sse` for server-sent events, else one JSON array written as it grows), `:countTokens`, and
`GET /v1beta/models[/{model}]`.

A request is translated into the OpenAI-shaped `GenerationRequest`, as the Anthropic and Responses
APIs are: `systemInstruction` and `contents` (text, `functionCall` and `functionResponse` parts)
become system/user/assistant/tool messages, `generationConfig` maps onto the sampling parameters
(`candidateCount` is `n`: forks of one prefill), `responseMimeType: application/json` with a
`responseSchema` (Gemini's OpenAPI subset, converted to JSON Schema) or `responseJsonSchema`
constrains the output, and `functionDeclarations` with `toolConfig` map onto tools and tool_choice.
Any field pie does not honour is a 400 naming it. Errors are Gemini-shaped
(`{"error": {code, message, status}}`, see `errors.py`). Reasoning comes back as parts with
`thought: true`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
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
from pie.server.api.served import served_model
from pie.server.openai import check_model, finish_timer, json_body, served_of, start_timer
from pie.server.openai_schema import GenerationRequest, OpenAIError, check_schema, common, parse_tools
from pie.server.state import STATE

PREFIX = "/v1beta/models"
_TOP = frozenset({"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
                  "model"})
_CONFIG = {"temperature": "temperature", "topP": "top_p", "topK": "top_k", "maxOutputTokens": "max_tokens",
           "stopSequences": "stop", "candidateCount": "n", "seed": "seed", "presencePenalty": "presence_penalty",
           "frequencyPenalty": "frequency_penalty"}
_OUTPUT = frozenset({"responseMimeType", "responseSchema", "responseJsonSchema", "responseModalities"})
_SCHEMA_COPY = frozenset({"title", "description", "enum", "required", "minItems", "maxItems", "minimum", "maximum",
                          "minLength", "maxLength", "pattern", "minProperties", "maxProperties", "default"})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(PREFIX, list_models)
    router.add_get(PREFIX + "/{target:.+}", get_model)
    router.add_post(PREFIX + "/{target:.+}", action)


def _error(request: web.Request, error: OpenAIError) -> web.Response:
    body = error_body(request.path, error.status, str(error), param=error.param)
    return web.json_response(body, status=error.status)


# -- request translation ---------------------------------------------------------------------------


def parse_generate(body: Any, model: str, *, stream: bool, counting: bool = False) -> GenerationRequest:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    _refuse_unknown(body, _TOP, "")
    config = body.get("generationConfig") or {}
    if not isinstance(config, dict):
        raise OpenAIError("generationConfig must be an object", param="generationConfig")
    _refuse_unknown(config, frozenset(_CONFIG) | _OUTPUT, "generationConfig.")
    modalities = config.get("responseModalities")
    if modalities not in (None, ["TEXT"]):
        raise OpenAIError("generationConfig.responseModalities: pie generates text only (['TEXT'])",
                          param="generationConfig.responseModalities")
    openai_body: dict[str, Any] = {"model": model, "stream": stream}
    for key, name in _CONFIG.items():
        openai_body[name] = config.get(key)
    if counting:
        openai_body["max_tokens"] = None
    tools, choice = _tools(body.get("tools"), body.get("toolConfig"))
    images: list[MediaPart] = []
    return GenerationRequest(mode="chat", messages=tuple(_conversation(body, images)),
                             tools=parse_tools(tools, choice, None), images=tuple(images),
                             json_schema=_response_schema(config), **common(openai_body, tokens_keys=("max_tokens",)))


def _refuse_unknown(value: dict[str, Any], known: frozenset[str], where: str) -> None:
    for key, item in value.items():
        if item is not None and key not in known:
            raise OpenAIError(f'Invalid JSON payload received. Unknown name "{key}" at \'{where.rstrip(".")}\': '
                              f"pie does not support `{where}{key}`", param=f"{where}{key}")


def _image(part: dict[str, Any], where: str, images: list[MediaPart]) -> str:
    """An `inlineData` {mimeType, data} or `fileData` {fileUri} part (allow-listed URLs) -> its marker."""
    if len(images) >= MAX_IMAGES:
        raise OpenAIError(f"{where}: more than {MAX_IMAGES} images in one request", param=where)
    if "inlineData" in part:
        inline = part["inlineData"]
        param = f"{where}.inlineData.data"
        mime = inline.get("mimeType") if isinstance(inline, dict) else None
        if not isinstance(mime, str) or not mime.startswith("image/"):
            raise OpenAIError(f"{where}.inlineData.mimeType is {mime!r}; pie takes image/* inline data",
                              param=f"{where}.inlineData.mimeType")
        images.append(MediaPart(param, decode_base64(inline.get("data"), param)))
    else:
        file = part["fileData"]
        uri = file.get("fileUri") if isinstance(file, dict) else None
        param = f"{where}.fileData.fileUri"
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
            raise OpenAIError(f"{param} must be an http(s) URL (pie has no Files API)", param=param)
        images.append(image_url_part(uri, param))
    return marker(len(images) - 1)


def _conversation(body: dict[str, Any], images: list[MediaPart]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("systemInstruction")
    if system is not None:
        text = system if isinstance(system, str) else _texts(system, "systemInstruction")
        if text:
            out.append({"role": "system", "content": text})
    contents = body.get("contents")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list) or not contents:
        raise OpenAIError("contents must be a non-empty array of {role, parts}", param="contents")
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        role = content.get("role", "user") if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise OpenAIError(f"{where}.role must be 'user' or 'model', got {role!r}", param=f"{where}.role")
        parts = content.get("parts")
        if not isinstance(parts, list):
            raise OpenAIError(f"{where}.parts must be an array", param=f"{where}.parts")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, part in enumerate(parts):
            here = f"{where}.parts[{j}]"
            if not isinstance(part, dict):
                raise OpenAIError(f"{here} must be an object", param=here)
            if "text" in part:
                if not part.get("thought"):  # earlier reasoning is not part of the prompt
                    texts.append(check_text(str(part["text"]), f"{here}.text") if role == "user" else str(part["text"]))
            elif ("inlineData" in part or "fileData" in part) and role == "user":
                texts.append(_image(part, here, images))
            elif "functionCall" in part and role == "model":
                call = part["functionCall"]
                name = str(call.get("name", ""))
                calls.append({"id": str(call.get("id") or f"call_{name}"), "type": "function",
                              "function": {"name": name, "arguments": json.dumps(call.get("args") or {})}})
            elif "functionResponse" in part and role == "user":
                response = part["functionResponse"]
                name = str(response.get("name", ""))
                out.append({"role": "tool", "name": name, "tool_call_id": str(response.get("id") or f"call_{name}"),
                            "content": json.dumps(response.get("response", {}), ensure_ascii=False)})
            else:
                kind = next(iter(part), "empty")
                raise OpenAIError(f"{here}: a {kind!r} part is not supported on a {role} turn (pie serves text: "
                                  "text, inlineData and fileData images, functionCall, functionResponse)", param=f"{here}.{kind}")
        if role == "model":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _texts(content: Any, where: str) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not all(isinstance(p, dict) and "text" in p for p in parts):
        raise OpenAIError(f"{where} must be {{parts: [{{text}}]}}", param=where)
    return "".join(str(p["text"]) for p in parts)


def _tools(tools: Any, config: Any) -> tuple[list[dict[str, Any]] | None, Any]:
    if tools is None:
        return None, None
    if not isinstance(tools, list):
        raise OpenAIError("tools must be an array", param="tools")
    declared: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or set(tool) - {"functionDeclarations"}:
            other = sorted(set(tool) - {"functionDeclarations"}) if isinstance(tool, dict) else ["?"]
            raise OpenAIError(f"tools[{i}].{other[0]} is not supported: pie takes functionDeclarations only",
                              param=f"tools[{i}].{other[0]}")
        for j, fn in enumerate(tool.get("functionDeclarations") or []):
            where = f"tools[{i}].functionDeclarations[{j}]"
            if not isinstance(fn, dict):
                raise OpenAIError(f"{where} must be {{name, description, parameters}}", param=where)
            _refuse_unknown(fn, frozenset({"name", "description", "parameters", "parametersJsonSchema"}), where + ".")
            schema = fn.get("parametersJsonSchema")
            if schema is None and fn.get("parameters") is not None:
                schema = openapi_to_json_schema(fn["parameters"], where + ".parameters")
            declared.append({"type": "function", "function": {"name": fn.get("name"),
                                                              "description": fn.get("description") or "",
                                                              "parameters": schema}})
    return declared, _tool_choice(config, [str(d["function"]["name"]) for d in declared])


def _tool_choice(config: Any, names: list[str]) -> Any:
    calling = (config or {}).get("functionCallingConfig") if isinstance(config, dict) else None
    if calling is None:
        return None
    mode = str(calling.get("mode", "AUTO")).upper()
    allowed = calling.get("allowedFunctionNames") or []
    where = "toolConfig.functionCallingConfig"
    if mode in ("AUTO", "MODE_UNSPECIFIED", "NONE"):
        if allowed:
            raise OpenAIError(f"{where}.allowedFunctionNames needs mode ANY", param=f"{where}.allowedFunctionNames")
        return "none" if mode == "NONE" else "auto"
    if mode != "ANY":
        raise OpenAIError(f"{where}.mode {mode!r}: use AUTO, ANY or NONE", param=f"{where}.mode")
    if not allowed or sorted(set(allowed)) == sorted(names):
        return "required"
    if len(allowed) == 1:
        return {"type": "function", "function": {"name": allowed[0]}}
    raise OpenAIError(f"{where}.allowedFunctionNames: pie forces one function or all of them, not a subset of "
                      f"{len(allowed)}", param=f"{where}.allowedFunctionNames")


def _response_schema(config: dict[str, Any]) -> dict[str, Any] | None:
    mime = config.get("responseMimeType") or "text/plain"
    given = [k for k in ("responseSchema", "responseJsonSchema") if config.get(k) is not None]
    if mime == "text/plain":
        if given:
            raise OpenAIError(f"generationConfig.{given[0]} needs responseMimeType 'application/json'",
                              param=f"generationConfig.{given[0]}")
        return None
    if mime != "application/json":
        raise OpenAIError(f"generationConfig.responseMimeType {mime!r}: use 'text/plain' or 'application/json'",
                          param="generationConfig.responseMimeType")
    if len(given) == 2:
        raise OpenAIError("send responseSchema or responseJsonSchema, not both",
                          param="generationConfig.responseJsonSchema")
    if not given:
        return {}  # JSON mode: any JSON value
    key = given[0]
    schema = config[key] if key == "responseJsonSchema" else openapi_to_json_schema(config[key], f"generationConfig.{key}")
    if not isinstance(schema, dict):
        raise OpenAIError(f"generationConfig.{key} must be a schema object", param=f"generationConfig.{key}")
    check_schema(schema, f"generationConfig.{key}")
    return schema


def openapi_to_json_schema(schema: Any, where: str) -> dict[str, Any]:
    """Gemini's Schema (an OpenAPI 3.0 subset: `type: "STRING"`, `nullable`, `propertyOrdering`) as the
    JSON Schema llguidance enforces."""
    if not isinstance(schema, dict):
        raise OpenAIError(f"{where} must be a Schema object", param=where)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            kind = str(value).lower()
            if kind != "type_unspecified":
                out["type"] = kind
        elif key == "properties":
            props = {n: openapi_to_json_schema(s, f"{where}.properties.{n}") for n, s in (value or {}).items()}
            order = schema.get("propertyOrdering") or []
            out["properties"] = {**{n: props[n] for n in order if n in props}, **props}
        elif key == "items":
            out["items"] = openapi_to_json_schema(value, f"{where}.items")
        elif key == "anyOf":
            out["anyOf"] = [openapi_to_json_schema(s, f"{where}.anyOf[{i}]") for i, s in enumerate(value)]
        elif key == "format":
            if value in ("date-time", "date", "time"):  # int32, float, enum, ...: no JSON Schema meaning
                out["format"] = value
        elif key in _SCHEMA_COPY:
            out[key] = value
        elif key not in ("nullable", "propertyOrdering", "example"):
            raise OpenAIError(f"{where}.{key} is not a Schema field pie can enforce", param=f"{where}.{key}")
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)  # as Gemini answers: only the declared properties
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out


# -- handlers -------------------------------------------------------------------------------------


def _card(request: web.Request, name: str) -> dict[str, Any]:
    served = served_model(request.app[STATE].runtime, name)
    limit = served.max_model_len if served is not None else 0
    return {"name": f"models/{name}", "baseModelId": name, "displayName": name, "inputTokenLimit": limit,
            "outputTokenLimit": limit, "supportedGenerationMethods": ["generateContent", "streamGenerateContent",
                                                                      "countTokens"]}


async def list_models(request: web.Request) -> web.Response:
    try:
        auth.user_of(request)
    except OpenAIError as error:
        return _error(request, error)
    names = [m.name for m in request.app[STATE].runtime.models()]
    return web.json_response({"models": [_card(request, n) for n in names]})


async def get_model(request: web.Request) -> web.Response:
    try:
        auth.user_of(request)
        name = request.match_info["target"]
        check_model(request.app[STATE], name)
    except OpenAIError as error:
        return _error(request, error)
    return web.json_response(_card(request, name))


async def action(request: web.Request) -> web.StreamResponse:
    model, _, verb = request.match_info["target"].rpartition(":")
    if verb not in ("generateContent", "streamGenerateContent", "countTokens") or not model:
        return _error(request, OpenAIError(f"no method {verb!r} on models: use :generateContent, "
                                           ":streamGenerateContent or :countTokens", status=404))
    if verb == "countTokens":
        return await _count(request, model)
    return await _generate(request, model, stream=verb == "streamGenerateContent")


async def _count(request: web.Request, model: str) -> web.Response:
    try:
        auth.user_of(request)
        body = await json_body(request)
        if isinstance(body, dict) and isinstance(body.get("generateContentRequest"), dict):
            body = {k: v for k, v in body["generateContentRequest"].items() if k != "model"}
        req = parse_generate(body, model, stream=False, counting=True)
        served = served_of(request.app[STATE], model)
        plan = build_plan(await fetch_images(req, served, request.app[STATE].options), served)  # images counted
    except OpenAIError as error:
        return _error(request, error)
    return web.json_response({"totalTokens": plan.prompt_tokens})


async def _generate(request: web.Request, model: str, *, stream: bool) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        username = auth.user_of(request)
        req = parse_generate(await json_body(request), model, stream=stream)
        served = served_of(state, model)
        plan = build_plan(await fetch_images(req, served, state.options), served)
        process = await generation.launch(state, plan, username)
    except OpenAIError as error:
        return _error(request, error)
    except RequestError as error:
        return _error(request, OpenAIError(str(error), status=503))
    shape = _Shape(plan)
    timer = start_timer(request, plan)
    outcome: Outcome | None = None
    try:
        if stream:
            response, outcome = await _stream(request, plan, process, shape, timer)
            return response
        try:
            outcome = await generation.collect(process, timer)
        except GenerationFailed as error:
            return _error(request, OpenAIError(str(error), status=500))
        candidates = []
        for result in outcome.choices:
            split = OutputSplitter(plan.model, parse_tools=plan.parse_tools).whole(result.text, result.tokens)
            candidates.append(shape.candidate(result.index, _parts(split), result))
        return web.json_response(shape.response(candidates, outcome))
    finally:
        finish_timer(timer, outcome)
        await generation.finished(process)


def _parts(split: Split) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if split.reasoning:
        parts.append({"text": split.reasoning, "thought": True})
    if split.content or not split.calls:
        parts.append({"text": split.content})
    for call in split.calls:
        parts.append({"functionCall": {"name": call.name, "args": _args(call.arguments)}})
    return parts


def _args(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return {"_raw": arguments}


class _Shape:
    """GenerateContentResponse objects of one request."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.rid = plan, uuid.uuid4().hex[:24]

    def candidate(self, index: int, parts: list[dict[str, Any]], result: ChoiceResult | None) -> dict[str, Any]:
        out: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
        if result is not None:
            out["finishReason"] = "MAX_TOKENS" if result.finish_reason == "length" else "STOP"
        return out

    def response(self, candidates: list[dict[str, Any]], outcome: Outcome | None) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": candidates, "modelVersion": self.plan.request.model,
                               "responseId": self.rid}
        if outcome is not None:
            out["usageMetadata"] = {"promptTokenCount": outcome.prompt_tokens,
                                    "candidatesTokenCount": outcome.completion_tokens,
                                    "totalTokenCount": outcome.prompt_tokens + outcome.completion_tokens}
        return out


async def _stream(request: web.Request, plan: Plan, process: Any, shape: _Shape,
                  timer: Any) -> tuple[web.StreamResponse, Outcome | None]:
    """`?alt=sse`: one `data:` event per chunk; otherwise a JSON array of the chunks, as Gemini sends."""
    sse = request.query.get("alt") == "sse"
    kind = "text/event-stream" if sse else "application/json"
    response = web.StreamResponse(headers={"Content-Type": kind, "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent = 0

    async def send(obj: dict[str, Any]) -> None:
        nonlocal sent
        text = json.dumps(obj)
        await response.write((f"data: {text}\r\n\r\n" if sse else ("[" if not sent else ",\r\n") + text).encode())
        sent += 1

    count = plan.request.n * max(len(plan.prompts), 1)
    splitters = [OutputSplitter(plan.model, parse_tools=plan.parse_tools) for _ in range(count)]
    outcome: Outcome | None = None
    try:
        async for item in generation.run(process, timer):
            if isinstance(item, Delta):
                parts = _piece_parts(splitters[item.index].push(item.text, item.tokens))
                if parts:
                    await send(shape.response([shape.candidate(item.index, parts, None)], None))
                continue
            outcome = item
            for result in item.choices:
                pieces, calls = splitters[result.index].finish()
                parts = _piece_parts(pieces) + [{"functionCall": {"name": c.name, "args": _args(c.arguments)}}
                                                for c in calls]
                last = result.index == item.choices[-1].index
                await send(shape.response([shape.candidate(result.index, parts or [{"text": ""}], result)],
                                          item if last else None))
    except GenerationFailed as error:
        await send(error_body(request.path, 500, str(error)))
    if not sse:
        await response.write(b"]" if sent else b"[]")
    await response.write_eof()
    return response, outcome


def _piece_parts(pieces: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"text": text, "thought": True} if kind == "reasoning" else {"text": text} for kind, text in pieces]
