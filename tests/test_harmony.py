"""GPT-OSS harmony: prompts rendered by openai-harmony's encoder, outputs split by its parser.

The parser is tested on real harmony token sequences that openai-harmony itself encodes (reasoning,
tool calls, final answers), fed whole and token by token as a stream would; one request against a
server on a tiny random gpt_oss checkpoint shows the chat route renders its prompt through harmony.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai_harmony")
from openai_harmony import Author, Conversation, Message, Role

from pie.server.api import harmony
from pie.server.api.harmony import ChannelParser, HarmonyUnavailable

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie-home"))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)


def _completion(*messages: Message) -> list[int]:
    """What the model generates after `<|start|>assistant`: harmony's own encoding of `messages`."""
    enc = harmony.encoding()
    tokens = [t for m in messages for t in enc.render(m)]  # each message: render_conversation drops analysis
    assert harmony.encoding().decode(tokens[:2]) == "<|start|>assistant"
    return tokens[2:]


def _assistant(text: str, channel: str, recipient: str | None = None) -> Message:
    message = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient is not None:
        message = message.with_recipient(recipient).with_content_type("<|constrain|>json")
    return message


def _split(tokens: list[int], *, step: int, parse_tools: bool = True) -> tuple[str, str, list[Any]]:
    parser = ChannelParser(parse_tools=parse_tools)
    pieces = []
    for start in range(0, len(tokens), step):
        pieces += parser.push(tokens[start:start + step])
    more, calls = parser.finish()
    pieces += more
    reasoning = "".join(text for kind, text in pieces if kind == "reasoning")
    content = "".join(text for kind, text in pieces if kind == "content")
    return reasoning, content, calls


@pytest.mark.parametrize("step", [1, 3, 10_000])  # token by token, in steps, whole
def test_reasoning_and_final(step: int) -> None:
    tokens = _completion(_assistant("The user greets; answer briefly.", "analysis"),
                         _assistant("Hello! How can I help?", "final"))
    reasoning, content, calls = _split(tokens, step=step)
    assert reasoning == "The user greets; answer briefly."
    assert content == "Hello! How can I help?" and calls == []


@pytest.mark.parametrize("step", [1, 10_000])
def test_tool_calls_from_the_commentary_channel(step: int) -> None:
    tokens = _completion(_assistant("Need the weather for both.", "analysis"),
                         _assistant('{"city": "Paris"}', "commentary", "functions.get_weather"),
                         _assistant('{"city":"Oslo"}', "commentary", "functions.get_weather"))
    assert tokens[-1] in harmony.stop_tokens()  # ends at <|call|>
    reasoning, content, calls = _split(tokens, step=step)
    assert reasoning == "Need the weather for both." and content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]


def test_without_tools_a_call_stays_text() -> None:
    tokens = _completion(_assistant('{"city": "Paris"}', "commentary", "functions.get_weather"))
    _, content, calls = _split(tokens, step=1, parse_tools=False)
    assert calls == [] and content == '{"city": "Paris"}'


def test_broken_output_becomes_content() -> None:
    enc = harmony.encoding()
    tokens = enc.encode("no channel header here", allowed_special="all")  # not harmony: the parser gives up
    _, content, calls = _split(list(tokens), step=1)
    assert calls == [] and "channel header here" in content


def test_render_matches_harmonys_own() -> None:
    from openai_harmony import DeveloperContent, SystemContent, ToolDescription

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true}'}]
    tokens = harmony.render(history, [WEATHER])
    fn = WEATHER["function"]
    expected = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Be brief.")
                                      .with_function_tools([ToolDescription.new(
                                          fn["name"], fn["description"], parameters=fn["parameters"])])),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        _assistant('{"city": "Paris"}', "commentary", "functions.get_weather"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"sunny": true}')
        .with_channel("commentary").with_recipient("assistant")])
    assert tokens == list(harmony.encoding().render_conversation_for_completion(expected, Role.ASSISTANT))
    text = harmony.encoding().decode(tokens)
    assert "type get_weather" in text and "to=functions.get_weather" in text
    assert text.endswith("<|start|>assistant")


def test_reasoning_effort_goes_in_the_system_message() -> None:
    from pie.server.openai_schema import OpenAIError, parse_chat

    hello = [{"role": "user", "content": "Hi"}]
    assert "Reasoning: medium" in harmony.encoding().decode(harmony.render(hello, None))
    assert "Reasoning: high" in harmony.encoding().decode(harmony.render(hello, None, reasoning_effort="high"))
    assert parse_chat({"model": "m", "messages": hello, "reasoning_effort": "low"}).reasoning_effort == "low"
    with pytest.raises(OpenAIError) as caught:
        parse_chat({"model": "m", "messages": hello, "reasoning_effort": "max"})
    assert caught.value.param == "reasoning_effort"


def test_vocab_unpacked_once_and_checked(tmp_path: Path) -> None:
    folder = harmony.vocab_dir()
    assert folder == tmp_path / "pie-home" / "cache" / "harmony"
    assert harmony._sha256(folder / harmony.VOCAB_FILE) == harmony.VOCAB_SHA256


def test_missing_vocab_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "empty"))
    with pytest.raises(HarmonyUnavailable, match=r"holds no o200k_base\.tiktoken"):
        harmony.vocab_dir()


def test_a_request_without_the_vocab_is_a_503_not_a_download(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pie.server.api.plan import build_plan
    from pie.server.api.served import ServedModel
    from pie.server.openai_schema import OpenAIError, parse_chat

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "max_position_embeddings": 4096}))
    model = ServedModel("gpt-oss", tmp_path, None, {"vocab_size": 201_088})
    assert model.harmony
    monkeypatch.setattr(harmony, "_encoding", None)  # as in a fresh server process
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))  # a folder without the file
    with pytest.raises(OpenAIError) as caught:
        build_plan(parse_chat({"model": "gpt-oss", "messages": [{"role": "user", "content": "Hi"}]}), model)
    assert caught.value.status == 503 and "o200k_base.tiktoken" in str(caught.value)


# -- one request against a server on a tiny gpt_oss checkpoint ------------------------------------


async def test_chat_route_renders_through_harmony(tmp_path: Path) -> None:
    import httpx
    import torch
    from checkpoints import tiny_checkpoint
    from server_support import running_server

    from pie.engine.config import EngineConfig
    from pie.runtime.runtime import ModelSpec, RuntimeConfig, RuntimeLimits

    # Harmony's ids run to 201088, so the random model needs that vocabulary (narrow, to stay small).
    model_dir = tiny_checkpoint(tmp_path / "gpt-oss", "gpt_oss", vocab_size=201_088, hidden_size=32,
                                intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                tie_word_embeddings=True, dtype=torch.bfloat16)
    engine = EngineConfig(model=str(model_dir), device="cpu", max_num_kv_pages=64)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    config = RuntimeConfig((ModelSpec("gpt-oss", engine),), RuntimeLimits())
    async with running_server(config) as server, httpx.AsyncClient(base_url=server.http_url, timeout=120) as client:
        body = {"model": "gpt-oss", "messages": messages, "tools": [WEATHER], "max_tokens": 4,
                "temperature": 0, "reasoning_effort": "high"}
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        rendered = harmony.render(messages, [WEATHER], reasoning_effort="high")
        assert reply.json()["usage"]["prompt_tokens"] == len(rendered)
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        refused = await client.post("/v1/chat/completions", json={**body, "stop": ["x"]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop"
