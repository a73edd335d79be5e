"""OpenAI request validation: what clients send is accepted as they mean it; bad parameters are refused
with OpenAI's error shape, naming the parameter."""

from __future__ import annotations

import json

import pytest

from pie.server.openai_schema import OpenAIError, chunk, full_response, parse_chat, parse_completion


def test_chat_request_becomes_inferlet_input() -> None:
    req = parse_chat({
        "model": "m", "max_completion_tokens": 12, "temperature": 0, "stop": "\n", "seed": 5, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
    })
    data = json.loads(req.inferlet_input())
    assert data["mode"] == "chat" and data["max_tokens"] == 12 and data["temperature"] == 0.0
    assert data["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert data["stop"] == ["\n"] and data["seed"] == 5 and req.stream and req.include_usage


def test_completion_request_defaults() -> None:
    req = parse_completion({"model": "m", "prompt": ["Once"]})
    assert (req.mode, req.prompt, req.max_tokens, req.temperature, req.top_p, req.stream) == (
        "completion", "Once", 256, 1.0, 1.0, False)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "m", "messages": []}, "messages", "non-empty array"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]", "needs a `role`"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]",
     "only text parts"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "must name a served model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_completion_tokens",
     "integer from 1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature",
     "from 0.0 to 2.0"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "only n=1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "true or false"),
])
def test_bad_chat_parameters_are_refused(body: dict, param: str, words: str) -> None:
    with pytest.raises(OpenAIError, match=words) as caught:
        parse_chat(body)
    error = caught.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and caught.value.status == 400


def test_completion_refuses_several_prompts() -> None:
    with pytest.raises(OpenAIError, match="one prompt per request"):
        parse_completion({"model": "m", "prompt": ["a", "b"]})


def test_response_shapes() -> None:
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    result = {"text": "hello", "finish_reason": "length", "prompt_tokens": 4, "completion_tokens": 2}
    full = full_response(req, "chatcmpl-1", 10, result)
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["content"] == "hello"
    assert full["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert chunk(req, "chatcmpl-1", 10, None, role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(req, "chatcmpl-1", 10, "he")["choices"][0]["delta"] == {"content": "he"}
    completion = parse_completion({"model": "m", "prompt": "x"})
    assert chunk(completion, "cmpl-1", 10, "he")["choices"][0]["text"] == "he"
