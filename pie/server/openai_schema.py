"""OpenAI API request validation and response shapes (chat completions, completions).

A request becomes a `GenerationRequest`, whose `inferlet_input()` is the JSON
input of the `openai-compat` inferlet. That inferlet streams
`{"delta": text}` messages and returns
`{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`; the
functions at the bottom turn those into OpenAI's objects.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pie.errors import RequestError

MAX_TOKENS_DEFAULT = 256
MAX_TOKENS_LIMIT = 32768
MAX_STOP_SEQUENCES = 4
ROLES = {"system", "developer", "user", "assistant"}


class OpenAIError(RequestError):
    """A request the OpenAI API refuses; rendered as `{"error": {...}}` with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    mode: Literal["chat", "completion"]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] = ()  # chat: {role, content}
    prompt: str = ""  # completion

    def inferlet_input(self) -> str:
        fields = asdict(self)
        fields["stop"] = list(self.stop)
        fields["messages"] = list(self.messages)
        return json.dumps(fields)


def parse_chat(body: Any) -> GenerationRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("`messages` must be a non-empty array of {role, content}", param="messages")
    return GenerationRequest(mode="chat", messages=tuple(_message(m, i) for i, m in enumerate(messages)),
                             **_common(body, tokens_keys=("max_completion_tokens", "max_tokens")))


def parse_completion(body: Any) -> GenerationRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError("`prompt` must be a string (one prompt per request)", param="prompt")
    return GenerationRequest(mode="completion", prompt=prompt, **_common(body, tokens_keys=("max_tokens",)))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    return body


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise OpenAIError(f"{param} needs a `role` of {sorted(ROLES)}", param=param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise OpenAIError(f"{param}.content: only text parts are supported", param=param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise OpenAIError(f"{param}.content must be a string or text parts", param=param)
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}


def _common(body: dict[str, Any], tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("`model` must name a served model (GET /v1/models lists them)", param="model")
    if body.get("n", 1) != 1:
        raise OpenAIError(f"`n` is {body.get('n')}; only n=1 is supported", param="n")
    max_tokens = next((body[k] for k in tokens_keys if body.get(k) is not None), MAX_TOKENS_DEFAULT)
    stream_options = body.get("stream_options") or {}
    return {
        "model": model,
        "max_tokens": _int(max_tokens, tokens_keys[0], 1, MAX_TOKENS_LIMIT),
        "temperature": _number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        "top_p": _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0),
        "stop": _stop(body.get("stop")),
        "seed": None if body.get("seed") is None else _int(body["seed"], "seed", 0, 2**63 - 1),
        "stream": _bool(body.get("stream", False), "stream"),
        "include_usage": isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
    }


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise OpenAIError(f"`{name}` is {value!r}; use an integer from {low} to {high}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise OpenAIError(f"`{name}` is {value!r}; use a number from {low} to {high}", param=name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OpenAIError(f"`{name}` is {value!r}; use true or false", param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else (value or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError("`stop` must be a non-empty string or an array of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(f"`stop` has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}", param="stop")
    return tuple(stops)


# -- responses ----------------------------------------------------------------------------------


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result.get("prompt_tokens", 0)), int(result.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def full_response(req: GenerationRequest, rid: str, created: int, result: dict[str, Any]) -> dict[str, Any]:
    text, finish = str(result.get("text", "")), result.get("finish_reason", "stop")
    if req.mode == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish, "logprobs": None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice],
            "usage": usage(result)}


def chunk(req: GenerationRequest, rid: str, created: int, text: str | None,
          finish: str | None = None, *, role: bool = False) -> dict[str, Any]:
    """One streamed chunk: a text delta, the opening role delta, or the closing finish_reason."""
    if req.mode == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, rid: str, created: int, result: dict[str, Any]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if req.mode == "chat" else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [],
            "usage": usage(result)}
