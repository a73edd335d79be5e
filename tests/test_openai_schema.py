"""OpenAI request validation: what clients send is accepted as they mean it; every parameter is honoured
or refused with OpenAI's error shape, naming it. Also the tool-call parsers and the reasoning splitter."""

from __future__ import annotations

import json

import llguidance
import pytest

from pie.server.api.auth import KeyRing, parse_entry
from pie.server.api.output import OutputSplitter
from pie.server.api.tool_parsers import FORMATS, Function, ToolCall, detect_format
from pie.server.openai_schema import REFUSED, OpenAIError, parse_chat, parse_completion

USER = [{"role": "user", "content": "x"}]


def test_chat_request_is_normalised() -> None:
    req = parse_chat({
        "model": "m", "max_completion_tokens": 12, "temperature": 0, "stop": "\n", "seed": 5, "stream": True,
        "stream_options": {"include_usage": True}, "top_k": 20, "min_p": 0.1, "n": 2, "logprobs": True,
        "top_logprobs": 3, "user": "u1", "presence_penalty": 0, "logit_bias": {},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "42"}],
    })
    assert req.max_tokens == 12 and req.max_tokens_param == "max_completion_tokens" and req.n == 2
    assert (req.sampling.temperature, req.sampling.top_k, req.sampling.min_p) == (0.0, 20, 0.1)
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert req.messages[1]["content"] == "hi there"
    assert req.messages[2]["tool_calls"][0]["function"]["name"] == "f"
    assert req.messages[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert req.stop == ("\n",) and req.seed == 5 and req.stream and req.include_usage and req.logprobs == 3


def test_completion_prompt_forms() -> None:
    assert parse_completion({"model": "m", "prompt": "Once"}).prompts == ("Once",)
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}).prompts == ("a", "b")
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompts == ((1, 2, 3),)
    assert parse_completion({"model": "m", "prompt": [[1], [2, 3]]}).prompts == ((1,), (2, 3))


CHAT_BAD = [
    ({"messages": []}, "messages", "non-empty array"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]", "needs a `role`"),
    ({"messages": [{"role": "user", "content": [{"type": "file"}]}]}, "messages[0].content[0]",
     "only text, image_url and input_audio parts"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].input_audio",
     "must be an object {data, format}"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "mp3"}}]}]},
     "messages[0].content[0].input_audio.format", "WAV audio only"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data", "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url.url",
     "must be a data: URL"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]",
     "only text parts"),
    ({"model": None}, "model", "must name a served model"),
    ({"max_tokens": 0}, "max_tokens", "integer from 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "integer from 1"),
    ({"temperature": 3}, "temperature", "from 0.0 to 2.0"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"min_p": 2}, "min_p", "from 0.0 to 1.0"),
    ({"top_k": -2}, "top_k", "integer from -1"),
    ({"n": 0}, "n", "integer from 1"),
    ({"n": 99}, "n", "integer from 1"),
    ({"stop": ["a"] * 17}, "stop", "at most 16"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"top_logprobs": 3}, "top_logprobs", "needs `logprobs: true`"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "integer from 0 to 20"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with `stream: true`"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "not a JSON schema"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters"),
    ({"tool_choice": "required"}, "tool_choice", "no `tools`"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "does not declare"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "must name the call"),
    ({"store": True}, "store", "does not store"),
    ({"service_tier": "flex"}, "service_tier", "one tier"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ({"ignore_eos": 1}, "ignore_eos", "true or false"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "token ids"),
]


@pytest.mark.parametrize(("patch", "param", "words"), CHAT_BAD)
def test_bad_chat_parameters_are_refused(patch: dict, param: str, words: str) -> None:
    body = {"model": "m", "messages": USER, **patch}
    with pytest.raises(OpenAIError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) \
            as caught:
        parse_chat(body)
    error = caught.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and caught.value.status == 400


REFUSED_VALUES = {"audio": {"voice": "x"}, "modalities": ["text", "audio"],
                  "functions": [{"name": "f"}], "function_call": "auto", "prediction": {"type": "content"},
                  "verbosity": "low", "web_search_options": {}, "best_of": 3,
                  "suffix": "end"}


def test_every_refused_parameter_has_a_case() -> None:
    assert set(REFUSED_VALUES) == set(REFUSED)


@pytest.mark.parametrize("param", sorted(REFUSED_VALUES))
def test_refused_parameters_are_400s_naming_them(param: str) -> None:
    for parse, body in ((parse_chat, {"model": "m", "messages": USER}), (parse_completion, {"model": "m", "prompt": "x"})):
        with pytest.raises(OpenAIError) as caught:
            parse({**body, param: REFUSED_VALUES[param]})
        assert caught.value.param == param and caught.value.status == 400 and param in str(caught.value)


def test_neutral_values_of_refused_parameters_pass() -> None:
    parse_chat({"model": "m", "messages": USER, "presence_penalty": 0, "frequency_penalty": 0.0,
                "repetition_penalty": 1, "logit_bias": {}, "modalities": ["text"], "store": False,
                "service_tier": "auto", "metadata": {"a": "b"}, "user": "u", "audio": None})


def test_penalties_and_logit_bias_are_parsed_with_their_ranges() -> None:
    req = parse_chat({"model": "m", "messages": USER, "presence_penalty": 0.5, "frequency_penalty": -1.0,
                      "repetition_penalty": 1.2, "logit_bias": {"7": -100, "5": 10}})
    s = req.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.2)
    assert s.logit_bias == ((5, 10.0), (7, -100.0))
    for bad, param in (({"presence_penalty": 2.1}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
                       ({"frequency_penalty": float("nan")}, "frequency_penalty")):
        with pytest.raises(OpenAIError) as caught:
            parse_completion({"model": "m", "prompt": "x", **bad})
        assert caught.value.param == param


def test_completion_parameters() -> None:
    streamed = parse_completion({"model": "m", "prompt": "x", "echo": True, "logprobs": 2, "stream": True})
    assert streamed.echo and streamed.stream and streamed.logprobs == 2  # the echo chunk carries the scores
    scoring = parse_completion({"model": "m", "prompt": "x", "echo": True, "logprobs": 2, "max_tokens": 0})
    assert scoring.max_tokens == 0 and scoring.echo and scoring.logprobs == 2
    with pytest.raises(OpenAIError) as caught:  # max_tokens 0 only scores the prompt: it needs echo
        parse_completion({"model": "m", "prompt": "x", "max_tokens": 0})
    assert caught.value.param == "max_tokens"
    for bad in ([], [[]], [1, "a"], 5, [True]):
        with pytest.raises(OpenAIError) as caught:
            parse_completion({"model": "m", "prompt": bad})
        assert caught.value.param == "prompt"
    with pytest.raises(OpenAIError) as caught:
        parse_completion({"model": "m", "prompt": "x", "messages": []})
    assert caught.value.param == "messages"


# -- tool calls ------------------------------------------------------------------------------------

WEATHER = Function("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"]})
ADD = Function("add", "", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]})


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_parses_what_it_writes(name: str) -> None:
    fmt = FORMATS[name]
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("add", '{"a": 1, "b": 2}')]
    if name == "mistral":
        text = "[TOOL_CALLS]" + json.dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls])
    else:
        text = ("\n" if name == "hermes" else "; ").join(fmt.call_text(c) for c in calls)
    content, parsed = fmt.parse(text)
    assert parsed == calls and content == ""
    assert fmt.parse("just words")[1] == []
    grammar = llguidance.LLMatcher.grammar_from_lark(fmt.grammar([WEATHER, ADD], True, lambda t: 7))
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""


def test_hermes_keeps_text_around_calls_and_bad_json() -> None:
    fmt = FORMATS["hermes"]
    content, calls = fmt.parse('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content == "Let me check." and calls == [ToolCall("f", '{"x": 1}')]
    assert fmt.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert fmt.hold_from("abc <tool_") == 4 and fmt.hold_from("abc") is None


def test_format_detection() -> None:
    assert detect_format("...[TOOL_CALLS]...").name == "mistral"
    assert detect_format("{{ '<tool_call>' }}").name == "hermes"
    assert detect_format("<|python_tag|> ipython").name == "llama3_json"
    assert detect_format(None).name == "hermes"


class _FakeModel:
    """What OutputSplitter reads of a ServedModel."""

    def __init__(self, reasoning: bool, from_start: bool = False) -> None:
        self.reasoning, self.thinks_from_start, self.tool_format = reasoning, from_start, FORMATS["hermes"]
        self.harmony = False


@pytest.mark.parametrize("pieces", [["<think>plan</think>\n\nAnswer <tool_call>{\"name\": \"f\", \"arguments\": {}}"
                                     "</tool_call>"],
                                    list("<think>plan</think>\n\nAnswer <tool_call>{\"name\": \"f\", \"arguments\": "
                                         "{}}</tool_call>")])
def test_reasoning_content_and_calls_split_in_any_chunking(pieces: list[str]) -> None:
    splitter = OutputSplitter(_FakeModel(True), parse_tools=True)  # type: ignore[arg-type]
    out = [p for piece in pieces for p in splitter.push(piece)]
    tail, calls = splitter.finish()
    text = {"reasoning": "", "content": ""}
    for kind, piece in [*out, *tail]:
        text[kind] += piece
    assert text == {"reasoning": "plan", "content": "Answer "} and calls == [ToolCall("f", "{}")]


def test_no_think_block_is_all_content() -> None:
    split = OutputSplitter(_FakeModel(True), parse_tools=False).whole("Hello <b>")  # type: ignore[arg-type]
    assert (split.reasoning, split.content) == ("", "Hello <b>")
    split = OutputSplitter(_FakeModel(True, from_start=True), parse_tools=False).whole("hmm</think>Hi")  # type: ignore[arg-type]
    assert (split.reasoning, split.content) == ("hmm", "Hi")


# -- keys ------------------------------------------------------------------------------------------


def test_api_key_entries() -> None:
    import hashlib

    digest = hashlib.sha256(b"sk-secret").hexdigest()
    ring = KeyRing.from_entries(["alice=sk-a", f"sha256:{digest}", f"bob=sha256:{digest.upper()}"],
                                env={"PIE_API_KEY": "sk-env"})
    assert ring.user_for("sk-a") == "alice"
    assert ring.user_for("sk-secret") == f"key:{digest[:12]}"  # the first entry with that hash
    assert ring.user_for("sk-env") == parse_entry("sk-env").user and ring.user_for("nope") is None


# -- chat templates that know tools ----------------------------------------------------------------

# A small ChatML template in the Hermes/Qwen style (written for this test): tools in the system turn,
# assistant calls as <tool_call> JSON, results as a user turn of <tool_response> blocks.
TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Tools:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_native_tool_templates_render_the_whole_agent_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pie.runtime.tokenizer import ModelTokenizer
    from pie.server.api.served import ServedModel
    from pie.tiny_model import write_tokenizer_files

    write_tokenizer_files(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    tok = ModelTokenizer(tmp_path)
    model = ServedModel("m", None, tok, {"vocab_size": tok.vocab_size})
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "",
                                               "parameters": {"type": "object"}}}]
    history = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "rain"}]
    text = tok.decode(model.render_chat(history, tools))
    assert model.tool_format.name == "hermes"
    assert "Be exact.\n\nTools:\n<tools>\n" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\nrain\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    # The plain ChatML template knows no tools: pie's convention lists them in the system turn instead,
    # and the assistant's call is written in the format the convention asks for.
    write_tokenizer_files(tmp_path / "plain")
    plain_tok = ModelTokenizer(tmp_path / "plain")
    plain = ServedModel("p", None, plain_tok, {"vocab_size": plain_tok.vocab_size})
    text = plain_tok.decode(plain.render_chat(history, tools))
    assert "Be exact.\n\nYou can call these tools" in text and "get_weather" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
