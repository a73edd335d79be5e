"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions`,
`/v1/completions`, served by the standard `openai-compat` inferlet on the same runtime.

A request is validated (`openai_schema`), its prompt rendered to tokens and checked against the
context (`api.plan`), and one `openai-compat` process launched with the plan. Its `{"i", "delta"}`
messages become SSE chunks (`stream: true`), its return value the final object. Generated text is
split into reasoning, content and tool calls (`api.output`). The process is terminated if the HTTP
client goes away first, which frees its pages.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pie.errors import RequestError
from pie.server.api import auth, generation
from pie.server.api.auth import ARRIVED_KEY
from pie.server.api.generation import ChoiceResult, Delta, GenerationFailed, LogprobEntry, Outcome
from pie.server.api.images import fetch_images
from pie.server.api.output import OutputSplitter, Split
from pie.server.api.plan import Plan, build_plan
from pie.server.api.served import ServedModel, served_model
from pie.server.metrics import RequestTimer
from pie.server.openai_schema import GenerationRequest, OpenAIError, parse_chat, parse_completion
from pie.server.safe_json import loads_limited
from pie.server.state import STATE, ServerState

Parser = Callable[[Any], GenerationRequest]


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", models)
    router.add_get("/v1/models/{model_id:.+}", model)
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/completions", completions)


def _model_card(served: ServedModel | None, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "pie"}
    if served is not None and served.max_model_len:
        card["max_model_len"] = served.max_model_len
    return card


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        auth.user_of(request)
    except OpenAIError as error:
        return _error(error)
    data = [_model_card(served_model(state.runtime, m.name), m.name) for m in state.runtime.models()]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        auth.user_of(request)
        name = request.match_info["model_id"]
        check_model(state, name)
    except OpenAIError as error:
        return _error(error)
    return web.json_response(_model_card(served_model(state.runtime, name), name))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


def _error(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def start_timer(request: web.Request, plan: Plan) -> RequestTimer:
    return request.app[STATE].metrics.timer(plan.request.model, request.get(ARRIVED_KEY, time.monotonic()))


def finish_timer(timer: RequestTimer, outcome: Outcome | None) -> None:
    if outcome is None:
        timer.finish()
    else:
        timer.finish(outcome.prompt_tokens, outcome.completion_tokens,
                     tuple(c.finish_reason for c in outcome.choices))


async def prepare(request: web.Request, parse: Parser, **plan_options: Any) -> tuple[Plan, str]:
    """Authenticate, validate, render and check a request: (its plan, the user it runs as)."""
    state = request.app[STATE]
    username = auth.user_of(request)
    req = parse(await json_body(request))
    served = served_of(state, req.model)
    req = await fetch_images(req, served, state.options)
    return build_plan(req, served, **plan_options), username


async def _generate(request: web.Request, parse: Parser) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        plan, username = await prepare(request, parse)
        process = await generation.launch(state, plan, username)
    except OpenAIError as error:
        return _error(error)
    except RequestError as error:  # shutting down, openai-compat not installed, ...
        return _error(OpenAIError(str(error), status=503, kind="server_error"))
    rid, created = f"{'chatcmpl' if plan.request.mode == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    timer = start_timer(request, plan)
    outcome: Outcome | None = None
    try:
        if plan.request.stream:
            response, outcome = await _stream(request, plan, process, rid, created, timer)
            return response
        try:
            outcome = await generation.collect(process, timer)
        except GenerationFailed as error:
            return _error(OpenAIError(str(error), status=500, kind="server_error"))
        return web.json_response(full_response(plan, rid, created, outcome))
    finally:
        finish_timer(timer, outcome)
        await generation.finished(process)


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=loads_limited)  # depth, NaN, surrogates: InputError, a 400
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAIError(f"the request body is not JSON: {error}") from None


def check_model(state: ServerState, model_name: str) -> None:
    served = [m.name for m in state.runtime.models()]
    if model_name not in served:
        raise OpenAIError(f"the model {model_name!r} is not served here; served: {', '.join(served)}",
                          status=404, param="model", code="model_not_found")


def served_of(state: ServerState, model_name: str) -> ServedModel:
    check_model(state, model_name)
    served = served_model(state.runtime, model_name)
    if served is None:
        raise OpenAIError("this runtime does not expose its models' tokenizers; the HTTP APIs need them",
                          status=503, kind="server_error")
    return served


# -- responses ------------------------------------------------------------------------------------


def usage(outcome: Outcome) -> dict[str, int]:
    prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def full_response(plan: Plan, rid: str, created: int, outcome: Outcome) -> dict[str, Any]:
    req = plan.request
    choices = []
    for result in outcome.choices:
        if req.mode == "chat":
            split = OutputSplitter(plan.model, parse_tools=plan.parse_tools).whole(result.text, result.tokens)
            choices.append({"index": result.index, "message": chat_message(split),
                            "finish_reason": "tool_calls" if split.calls else result.finish_reason,
                            "logprobs": chat_logprobs(plan.model, result.logprobs) if req.logprobs is not None
                            else None})
        else:
            prompt_text = _echo_text(plan, result.index)
            entries = result.logprobs
            if req.echo:  # the prompt's tokens first: the very first has no logprob (nothing before it)
                first = plan.prompts[result.index // req.n][0]
                entries = [[first, None, None], *result.prompt_logprobs, *entries]
            choices.append({"index": result.index, "text": prompt_text + result.text,
                            "finish_reason": result.finish_reason,
                            "logprobs": completion_logprobs(plan.model, entries) if req.logprobs is not None
                            else None})
    kind = "chat.completion" if req.mode == "chat" else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices,
            "usage": usage(outcome)}


def chat_message(split: Split) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": split.content if split.content or not split.calls
                               else None}
    if split.reasoning:
        message["reasoning_content"] = split.reasoning
    if split.calls:
        message["tool_calls"] = [{"id": _call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in split.calls]
    return message


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _echo_text(plan: Plan, index: int) -> str:
    if not plan.request.echo:
        return ""
    prompt = plan.request.prompts[index // plan.request.n]
    return prompt if isinstance(prompt, str) else plan.model.decode(list(prompt))


def _token_text(model: ServedModel, token: int) -> tuple[str, list[int]]:
    data = model.token_bytes(token)
    return data.decode("utf-8", "replace"), list(data)


def chat_logprobs(model: ServedModel, entries: list[LogprobEntry]) -> dict[str, Any]:
    content = []
    for token, logprob, top in entries:
        text, data = _token_text(model, token)
        alternatives = []
        for alt, alt_logprob in top:
            alt_text, alt_data = _token_text(model, alt)
            alternatives.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_data})
        content.append({"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_logprobs(model: ServedModel, entries: list[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    tokens, logprobs, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        text = _token_text(model, token)[0]
        tokens.append(text)
        logprobs.append(logprob)
        tops.append(None if top is None else {_token_text(model, alt)[0]: alt_logprob for alt, alt_logprob in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


# -- streaming ------------------------------------------------------------------------------------


class _ChatStream:
    """Per-choice state of a streamed chat completion."""

    def __init__(self, plan: Plan, rid: str, created: int) -> None:
        self.plan, self.rid, self.created = plan, rid, created
        count = plan.request.n * max(len(plan.prompts), 1)
        self.splitters = [OutputSplitter(plan.model, parse_tools=plan.parse_tools) for _ in range(count)]

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: list[LogprobEntry] | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish,
                  "logprobs": chat_logprobs(self.plan.model, logprobs) if logprobs else None}
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.plan.request.model, "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return [self.chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.splitters))]

    def delta(self, item: Delta) -> list[dict[str, Any]]:
        pieces = self.splitters[item.index].push(item.text, item.tokens)
        chunks = [self.chunk(item.index, _piece_delta(kind, text)) for kind, text in pieces]
        if item.logprobs:
            if chunks:
                chunks[-1]["choices"][0]["logprobs"] = chat_logprobs(self.plan.model, item.logprobs)
            else:
                chunks.append(self.chunk(item.index, {}, logprobs=item.logprobs))
        return chunks

    def closing(self, result: ChoiceResult) -> list[dict[str, Any]]:
        pieces, calls = self.splitters[result.index].finish()
        chunks = [self.chunk(result.index, _piece_delta(kind, text)) for kind, text in pieces]
        for k, call in enumerate(calls):
            chunks.append(self.chunk(result.index, {"tool_calls": [{
                "index": k, "id": _call_id(), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}]}))
        chunks.append(self.chunk(result.index, {}, "tool_calls" if calls else result.finish_reason))
        return chunks


def _piece_delta(kind: str, text: str) -> dict[str, Any]:
    return {"reasoning_content": text} if kind == "reasoning" else {"content": text}


class _CompletionStream:
    def __init__(self, plan: Plan, rid: str, created: int) -> None:
        self.plan, self.rid, self.created = plan, rid, created
        self.offsets: dict[int, int] = {}

    def chunk(self, index: int, text: str, finish: str | None = None,
              logprobs: list[LogprobEntry] | None = None) -> dict[str, Any]:
        lp = None
        if logprobs:
            lp = completion_logprobs(self.plan.model, logprobs, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": lp}
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.plan.request.model, "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        if not self.plan.request.echo or self.plan.request.logprobs is not None:
            return []  # with logprobs the echo waits for the prefill's scores (`delta`)
        count = self.plan.request.n * len(self.plan.prompts)
        return [self.chunk(i, _echo_text(self.plan, i)) for i in range(count)]

    def delta(self, item: Delta) -> list[dict[str, Any]]:
        if item.prompt_logprobs is not None:  # the echo, scored: the first token has no logprob
            first = self.plan.prompts[item.index // self.plan.request.n][0]
            entries = [[first, None, None], *item.prompt_logprobs]
            return [self.chunk(item.index, _echo_text(self.plan, item.index), logprobs=entries)]
        return [self.chunk(item.index, item.text, logprobs=item.logprobs)]

    def closing(self, result: ChoiceResult) -> list[dict[str, Any]]:
        return [self.chunk(result.index, "", result.finish_reason)]


async def _stream(request: web.Request, plan: Plan, process: Any, rid: str, created: int,
                  timer: RequestTimer) -> tuple[web.StreamResponse, Outcome | None]:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(obj: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    shaper: _ChatStream | _CompletionStream = (_ChatStream(plan, rid, created) if plan.request.mode == "chat"
                                               else _CompletionStream(plan, rid, created))
    for chunk in shaper.opening():
        await send(chunk)
    outcome: Outcome | None = None
    try:
        async for item in generation.run(process, timer):
            if isinstance(item, Delta):
                for chunk in shaper.delta(item):
                    await send(chunk)
                continue
            outcome = item
            for result in item.choices:
                for chunk in shaper.closing(result):
                    await send(chunk)
            if plan.request.include_usage:
                kind = "chat.completion.chunk" if plan.request.mode == "chat" else "text_completion"
                await send({"id": rid, "object": kind, "created": created, "model": plan.request.model,
                            "choices": [], "usage": usage(item)})
    except GenerationFailed as error:
        await send(OpenAIError(str(error), status=500, kind="server_error").body())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response, outcome
