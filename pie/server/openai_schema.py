"""OpenAI API request validation (chat completions, completions): every parameter honoured or refused.

A request body becomes a `GenerationRequest` (API-neutral: the Anthropic and Responses APIs build
the same object). Each parameter of OpenAI's API, plus vLLM's sampling extensions, is in one of three
tables: `SUPPORTED` (validated and honoured), `INFORMATIONAL` (accepted, has no effect on generation:
`user`, `metadata`, ...), or `REFUSED` (a 400 naming it unless the value is the neutral one, e.g.
`presence_penalty = 0`). Any other key is a 400 naming it, as OpenAI answers unknown arguments.
`null` means "not given" everywhere, as in OpenAI's API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from pie.errors import RequestError
from pie.server.api.tool_parsers import Function

if TYPE_CHECKING:
    from pie.server.api.images import MediaPart

MAX_TOKENS_DEFAULT = 256  # when the client gives none: this, or what is left of the context if less
MAX_STOP_SEQUENCES = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 1 << 20
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class OpenAIError(RequestError):
    """A request the OpenAI API refuses; rendered as `{"error": {...}}` with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    # OpenAI's (and vLLM's) penalties over the tokens generated so far, applied before temperature.
    presence_penalty: float = 0.0  # -p for every token that appeared
    frequency_penalty: float = 0.0  # -f times each token's count
    repetition_penalty: float = 1.0  # Hugging Face's: positive logits / r, negative ones * r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])


@dataclass(frozen=True)
class Tools:
    """Declared functions and how the model may use them."""

    functions: tuple[Function, ...]
    declared: tuple[dict[str, Any], ...]  # OpenAI `{"type": "function", "function": {...}}`, for the template
    choice: Literal["auto", "none", "required", "function"] = "auto"
    function: str | None = None  # the forced function (choice == "function")
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def allowed(self) -> list[Function]:
        return [f for f in self.functions if self.choice != "function" or f.name == self.function]


@dataclass(frozen=True)
class GenerationRequest:
    mode: Literal["chat", "completion"]
    model: str
    max_tokens: int | None = None  # None: MAX_TOKENS_DEFAULT or what is left of the context
    max_tokens_param: str = "max_tokens"  # the key the client used (errors name it)
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # report logprobs with this many top alternatives; None = off
    json_schema: dict[str, Any] | None = None  # response_format: generate under this schema
    tools: Tools | None = None
    stream: bool = False
    include_usage: bool = False
    messages: tuple[dict[str, Any], ...] = ()  # chat: normalised messages (see `_message`)
    prompts: tuple[str | tuple[int, ...], ...] = ()  # completion: text or token ids, one choice group each
    echo: bool = False
    reasoning_effort: str | None = None  # harmony (GPT-OSS) models only: low, medium or high
    images: tuple[MediaPart, ...] = ()  # chat: part i (an image or audio clip) is marked in the messages' text (`pie.server.api.images`)


# -- the parameter tables ---------------------------------------------------------------------------

_COMMON = {"model", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "stop_token_ids", "ignore_eos", "min_tokens", "stream", "stream_options", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias"}
SUPPORTED: dict[str, frozenset[str]] = {
    "chat": frozenset(_COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                 "response_format", "tools", "tool_choice", "parallel_tool_calls",
                                 "reasoning_effort"}),
    "completion": frozenset(_COMMON | {"prompt", "logprobs", "echo"}),
}
INFORMATIONAL = frozenset({"user", "metadata", "prompt_cache_key", "safety_identifier", "service_tier", "store"})


def _is_zero(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == 0


# parameter -> (is the value neutral?, why it is refused and what to do)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (lambda v: False, "pie generates text only (audio input is an `input_audio` message part)"),
    "modalities": (lambda v: v == ["text"], 'pie serves text only: modalities ["text"]'),
    "functions": (lambda v: False, "the deprecated `functions` are not supported; send `tools`"),
    "function_call": (lambda v: False, "the deprecated `function_call` is not supported; send `tool_choice`"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "verbosity": (lambda v: False, "the served models take no verbosity; leave it out"),
    "web_search_options": (lambda v: False, "pie has no web search"),
    "best_of": (lambda v: v == 1, "best_of is not supported; use `n` and pick on the client"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}
_STORE_OK = (False,)
_SERVICE_TIERS = ("auto", "default")


def check_parameters(body: dict[str, Any], mode: str) -> None:
    """Refuse unknown keys and refused parameters with non-neutral values (a 400 naming the key)."""
    for key, value in body.items():
        if value is None or key in SUPPORTED[mode]:
            continue
        if key in INFORMATIONAL:
            if key == "store" and value not in _STORE_OK:
                raise OpenAIError("`store` is true; pie does not store completions (send store=false or "
                                  "leave it out)", param="store")
            if key == "service_tier" and value not in _SERVICE_TIERS:
                raise OpenAIError(f"`service_tier` is {value!r}; pie has one tier: use 'auto' or 'default'",
                                  param="service_tier")
            continue
        if key in REFUSED:
            neutral, why = REFUSED[key]
            if not neutral(value):
                raise OpenAIError(f"`{key}` is not supported: {why}", param=key, code="unsupported_parameter")
            continue
        raise OpenAIError(f"Unrecognized request argument supplied: {key}", param=key,
                          code="unknown_parameter")


# -- chat -------------------------------------------------------------------------------------------


def parse_chat(body: Any) -> GenerationRequest:
    body = _object(body)
    check_parameters(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("`messages` must be a non-empty array of {role, content}", param="messages")
    images: list[MediaPart] = []
    normalised = tuple(_message(m, i, images) for i, m in enumerate(messages))
    tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    logprobs = _bool(body.get("logprobs") or False, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        top = _int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if not logprobs:
            raise OpenAIError("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise OpenAIError(f"`reasoning_effort` is {effort!r}; use one of {list(REASONING_EFFORTS)}",
                          param="reasoning_effort")
    return GenerationRequest(mode="chat", messages=normalised, tools=tools, reasoning_effort=effort,
                             logprobs=(top or 0) if logprobs else None,
                             json_schema=parse_response_format(body.get("response_format")),
                             images=tuple(images),
                             **common(body, tokens_keys=("max_completion_tokens", "max_tokens")))


ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")


def _message(message: Any, index: int, images: list[MediaPart] | None = None) -> dict[str, Any]:
    """{role, content} (+ tool_calls for assistants, tool_call_id for tool results); developer -> system."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        role = message.get("role") if isinstance(message, dict) else None
        hint = "; the deprecated `function` role is not supported: use `tool`" if role == "function" else ""
        raise OpenAIError(f"{param} needs a `role` of {list(ROLES)}, got {role!r}{hint}", param=param)
    role = message["role"]
    allowed = {"role", "content", "name"} | ({"tool_calls", "refusal"} if role == "assistant" else set()) \
        | ({"tool_call_id"} if role == "tool" else set())
    extra = sorted(k for k, v in message.items() if k not in allowed and v is not None)
    if extra:
        raise OpenAIError(f"{param}.{extra[0]} is not supported on a {role} message", param=f"{param}.{extra[0]}")
    content = message.get("content")
    if role == "assistant" and content is None:
        content = ""
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": _text_content(content, f"{param}.content",
                                                    images if role == "user" else None)}
    if message.get("name") is not None:
        out["name"] = str(message["name"])
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [_history_call(c, f"{param}.tool_calls[{i}]")
                             for i, c in enumerate(_list(message["tool_calls"], f"{param}.tool_calls"))]
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise OpenAIError(f"{param}.tool_call_id must name the call this result answers",
                              param=f"{param}.tool_call_id")
        out["tool_call_id"] = call_id
    return out


def _text_content(content: Any, param: str, images: list[MediaPart] | None = None) -> str:
    """The message's text; with `images` (user messages), `image_url` and `input_audio` parts are taken
    into it and marked in the text (`pie.server.api.images`)."""
    from pie.server.api.images import MAX_IMAGES, audio_part, check_text, image_url_part, marker

    if isinstance(content, str):
        return check_text(content, param) if images is not None else content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            where = f"{param}[{i}]"
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(check_text(part["text"], where) if images is not None else part["text"])
            elif images is not None and isinstance(part, dict) and part.get("type") == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if len(images) >= MAX_IMAGES:
                    raise OpenAIError(f"{where}: more than {MAX_IMAGES} images in one request", param=where)
                images.append(image_url_part(url, f"{where}.image_url.url"))
                texts.append(marker(len(images) - 1))
            elif images is not None and isinstance(part, dict) and part.get("type") == "input_audio":
                if len(images) >= MAX_IMAGES:
                    raise OpenAIError(f"{where}: more than {MAX_IMAGES} images and audio clips in one request",
                                      param=where)
                images.append(audio_part(part.get("input_audio"), f"{where}.input_audio"))
                texts.append(marker(len(images) - 1))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                allowed = "text, image_url and input_audio parts" if images is not None else "text parts"
                raise OpenAIError(f"{where} is a {kind!r} part: only {allowed} are supported here",
                                  param=where)
        return "".join(texts)
    raise OpenAIError(f"{param} must be a string or text parts", param=param)


def _history_call(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(call, dict) and call.get("type", "function") == "function" and isinstance(function, dict)
            and isinstance(function.get("name"), str)):
        raise OpenAIError(f"{param} must be {{id, type: 'function', function: {{name, arguments}}}}", param=param)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {"id": str(call.get("id", "")), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def parse_tools(tools: Any, choice: Any, parallel: Any) -> Tools | None:
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise OpenAIError(f"`tool_choice` is {choice!r} but no `tools` are given", param="tool_choice")
        return None
    functions, declared = [], []
    for i, tool in enumerate(_list(tools, "tools")):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise OpenAIError(f"{param} is of type {kind!r}; only function tools are supported",
                              param=f"{param}.type")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise OpenAIError(f"{param}.function.name must be 1-64 letters, digits, _ . or -; got {name!r}",
                              param=f"{param}.function.name")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise OpenAIError(f"{param}.function.parameters must be a JSON schema object",
                              param=f"{param}.function.parameters")
        check_schema(parameters, f"{param}.function.parameters")
        functions.append(Function(name, str(fn.get("description") or ""), parameters))
        declared.append({"type": "function", "function": {"name": name, "description": fn.get("description") or "",
                                                          "parameters": parameters}})
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise OpenAIError(f"`tools` declares a function twice: {names}", param="tools")
    parallel = _bool(True if parallel is None else parallel, "parallel_tool_calls")
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(tuple(functions), tuple(declared), choice or "auto", None, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise OpenAIError(f"`tool_choice` names function {name!r}, which `tools` does not declare "
                              f"(declared: {names})", param="tool_choice")
        return Tools(tuple(functions), tuple(declared), "function", name, parallel)
    raise OpenAIError(f"`tool_choice` is {choice!r}; use 'none', 'auto', 'required' or "
                      "{type: 'function', function: {name}}", param="tool_choice")


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema generation must follow, or None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise OpenAIError("`response_format` must be {type: 'text' | 'json_object' | 'json_schema'}",
                          param="response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise OpenAIError("`response_format.json_schema` must be {name, schema, strict}",
                          param="response_format.json_schema")
    schema = spec.get("schema") or {}
    check_schema(schema, "response_format.json_schema.schema")
    return schema


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Refuse a JSON schema llguidance cannot compile (a 400, not a failure mid-generation)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        message = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RuntimeError) as error:
        message = str(error)
    if message:
        raise OpenAIError(f"{param} is not a JSON schema pie can enforce: {message.strip()[:300]}", param=param)


# -- completions ------------------------------------------------------------------------------------


def parse_completion(body: Any) -> GenerationRequest:
    body = _object(body)
    check_parameters(body, "completion")
    prompts = _prompts(body.get("prompt"))
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _int(logprobs, "logprobs", 0, MAX_TOP_LOGPROBS)
    echo = _bool(body.get("echo") or False, "echo")
    return GenerationRequest(mode="completion", prompts=prompts, logprobs=logprobs, echo=echo,
                             **common(body, tokens_keys=("max_tokens",)))


def _prompts(prompt: Any) -> tuple[str | tuple[int, ...], ...]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    def ids(value: list[Any], param: str) -> tuple[int, ...]:
        if not value or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            raise OpenAIError(f"`{param}` must be a non-empty list of token ids (integers >= 0)", param="prompt")
        return tuple(value)

    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return (ids(prompt, "prompt"),)
        if all(isinstance(p, list) for p in prompt):
            return tuple(ids(p, f"prompt[{i}]") for i, p in enumerate(prompt))
    raise OpenAIError("`prompt` must be a string, a list of strings, a list of token ids, or a list of "
                      "token-id lists", param="prompt")


# -- shared -----------------------------------------------------------------------------------------


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    return body


def common(body: dict[str, Any], tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    """The sampling and stopping parameters chat and completions share."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("`model` must name a served model (GET /v1/models lists them)", param="model")
    given = [k for k in tokens_keys if body.get(k) is not None]
    key = given[0] if given else tokens_keys[-1]
    scoring = body.get("echo") is True  # completions' echo may score the prompt only (max_tokens 0)
    max_tokens = _int(body[key], key, 0 if scoring else 1, 1 << 31) if given else None
    stream_options = body.get("stream_options")
    stream = _bool(body.get("stream") or False, "stream")
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage",
                                                                           "continuous_usage_stats"}:
            raise OpenAIError("`stream_options` takes {include_usage: bool}", param="stream_options")
        if stream_options.get("continuous_usage_stats"):
            raise OpenAIError("`stream_options.continuous_usage_stats` is not supported",
                              param="stream_options.continuous_usage_stats")
        if not stream:
            raise OpenAIError("`stream_options` is only allowed with `stream: true`", param="stream_options")
    include_usage = _bool((stream_options or {}).get("include_usage") or False, "stream_options.include_usage")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None else _int(top_k, "top_k", -1, MAX_TOP_K)
    seed = body.get("seed")
    min_tokens = body.get("min_tokens")
    return {
        "model": model,
        "max_tokens": max_tokens,
        "max_tokens_param": key,
        "n": _int(body["n"], "n", 1, MAX_N) if body.get("n") is not None else 1,
        "sampling": Sampling(
            temperature=_number(_given(body, "temperature", 1.0), "temperature", 0.0, 2.0),
            top_p=_open_low(_given(body, "top_p", 1.0), "top_p"),
            top_k=max(top_k, 0),
            min_p=_number(_given(body, "min_p", 0.0), "min_p", 0.0, 1.0),
            presence_penalty=_number(_given(body, "presence_penalty", 0.0), "presence_penalty", -2.0, 2.0),
            frequency_penalty=_number(_given(body, "frequency_penalty", 0.0), "frequency_penalty", -2.0, 2.0),
            repetition_penalty=_positive(_given(body, "repetition_penalty", 1.0), "repetition_penalty"),
            logit_bias=_logit_bias(body.get("logit_bias"))),
        "seed": None if seed is None else _int(seed, "seed", -(1 << 63), (1 << 63) - 1 - MAX_N),
        "stop": _stop(body.get("stop")),
        "stop_token_ids": tuple(_token_ids(body.get("stop_token_ids"), "stop_token_ids")),
        "ignore_eos": _bool(body.get("ignore_eos") or False, "ignore_eos"),
        "min_tokens": 0 if min_tokens is None else _int(min_tokens, "min_tokens", 0, max_tokens or (1 << 31)),
        "stream": stream,
        "include_usage": include_usage,
    }


def _positive(value: Any, param: str) -> float:
    number = _number(value, param, 0.0, 2.0)
    if number == 0.0:
        raise OpenAIError(f"`{param}` must be greater than 0 (1 = no penalty)", param=param)
    return number


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map (ids as strings), biases in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise OpenAIError("`logit_bias` maps token ids (as strings) to a bias in [-100, 100]", param="logit_bias")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise OpenAIError(f"`logit_bias` key {key!r} is not a token id", param="logit_bias") from None
        if token < 0:
            raise OpenAIError(f"`logit_bias` key {key!r} is not a token id", param="logit_bias")
        out.append((token, _number(bias, f"logit_bias[{key}]", -100.0, 100.0)))
    return tuple(sorted(out))


def _given(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise OpenAIError(f"`{name}` is {value!r}; use an integer from {low} to {high}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise OpenAIError(f"`{name}` is {value!r}; use a number from {low} to {high}", param=name)
    return float(value)


def _open_low(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise OpenAIError(f"`{name}` is {value!r}; use a number in (0, 1] (1 keeps every token; for greedy "
                          "decoding set temperature to 0)", param=name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OpenAIError(f"`{name}` is {value!r}; use true or false", param=name)
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise OpenAIError(f"`{name}` must be an array", param=name)
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in value):
        raise OpenAIError(f"`{name}` must be an array of token ids (integers >= 0)", param=name)
    return list(value)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else (value or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError("`stop` must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(f"`stop` has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}", param="stop")
    return tuple(stops)
