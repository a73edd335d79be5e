"""ModelTokenizer: chat deltas equal transformers' apply_chat_template, stop tokens, vocab bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pie.errors import ChatTemplateError
from pie.runtime.tokenizer import ModelTokenizer
from pie.tiny_model import CHATML_TEMPLATE, build_tokenizer

# Qwen2.5-Instruct's template (tools, a default system prompt, tool turns folded into user turns).
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n'}}{% generation %}{{- message.content + '<|im_end|>' + '\n' }}{% endgeneration %}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3 Instruct: BOS on the first message, content trimmed (so the template rewrites content).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma: no system role, strict alternation, `model` as the assistant's role.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<bos>", "<start_of_turn>", "<end_of_turn>"]


def write_model(directory: Path, template: str | None, *, bos: str | None = None, eos: str = "<|im_end|>",
                generation_eos: Any = None) -> Path:
    tok = build_tokenizer(512)
    tok.add_special_tokens(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                              "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return directory


def reference(directory: Path, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory))
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def ours(tok: ModelTokenizer, messages: list[dict[str, str]], cue: bool) -> list[int]:
    """What an inferlet's fills add; a conversation without a system message starts with `begin`."""
    ids = tok.chat_tokens("begin") if messages[0]["role"] != "system" else []
    ids += [t for m in messages for t in tok.chat_tokens(m["role"], m["content"])]
    return ids + (tok.chat_tokens("cue") if cue else [])


CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
    {"role": "user", "content": " And  of Italy?\n"},
]


@pytest.mark.parametrize("template,bos,eos", [
    (CHATML_TEMPLATE, None, "<|im_end|>"),
    (QWEN25, None, "<|im_end|>"),
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
], ids=["chatml", "qwen2.5", "llama3"])
def test_chat_deltas_equal_apply_chat_template(tmp_path: Path, template: str, bos: str | None, eos: str) -> None:
    directory = write_model(tmp_path, template, bos=bos, eos=eos)
    tok = ModelTokenizer(directory)
    for convo in (CONVERSATION[:2], CONVERSATION[:3], CONVERSATION, CONVERSATION[1:]):
        assert ours(tok, convo, cue=True) == reference(directory, convo, add_generation_prompt=True)
        assert ours(tok, convo, cue=False) == reference(directory, convo)


def test_generated_turn_equals_rendered_assistant_turn(tmp_path: Path) -> None:
    """cue + generated text + seal is exactly what the template renders for that assistant turn."""
    tok = ModelTokenizer(write_model(tmp_path, QWEN25))
    generated = tok.chat_tokens("cue") + tok.encode("Paris, of course.") + tok.chat_tokens("seal")
    assert generated == tok.chat_tokens("assistant", "Paris, of course.")


def test_template_without_system_role_renders_system_as_first_user_turn(tmp_path: Path) -> None:
    directory = write_model(tmp_path, GEMMA, bos="<bos>", eos="<eos>")
    tok = ModelTokenizer(directory)
    system = tok.decode(tok.chat_tokens("system", "Be brief."))
    assert system == "<bos><start_of_turn>user\nBe brief.<end_of_turn>\n"
    convo = CONVERSATION[1:]
    assert ours(tok, convo, cue=True) == reference(directory, convo, add_generation_prompt=True)
    assert tok.decode(tok.chat_tokens("cue")) == "<start_of_turn>model\n"
    assert tok.stop_tokens == [tok.encode("<end_of_turn>")[0]]


def test_stop_tokens_merge_configs_and_end_of_turn(tmp_path: Path) -> None:
    directory = write_model(tmp_path, LLAMA3, bos="<|begin_of_text|>", eos="<|endoftext|>", generation_eos=[0, 1])
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    tok = ModelTokenizer(directory)
    eot = tok.encode("<|eot_id|>")
    assert len(eot) == 1
    assert tok.stop_tokens == sorted({0, 1, eot[0]})


def test_no_template_gives_plain_text_turns(tmp_path: Path) -> None:
    tok = ModelTokenizer(write_model(tmp_path, None, eos="<|endoftext|>"))
    assert tok.decode(tok.chat_tokens("user", "hi")) == "hi\n\n"
    assert tok.chat_tokens("cue") == []
    assert tok.decode(tok.chat_tokens("seal")) == "<|endoftext|>"
    assert tok.info()["chat_template"] is False


def test_tools_use_native_template_or_documented_convention(tmp_path: Path) -> None:
    tool = {"type": "function", "function": {"name": "calc", "description": "arithmetic",
                                             "parameters": {"type": "object", "properties": {}}}}
    request = json.dumps({"system": "Be exact.", "tools": [tool]})
    native = ModelTokenizer(write_model(tmp_path / "q", QWEN25))
    text = native.decode(native.chat_tokens("tools", request))
    assert text.startswith("<|im_start|>system\nBe exact.\n\n# Tools") and '"name": "calc"' in text
    answer = native.decode(native.chat_tokens("tool", json.dumps({"name": "calc", "content": "4"})))
    assert answer == "<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n"

    plain = ModelTokenizer(write_model(tmp_path / "c", CHATML_TEMPLATE))
    text = plain.decode(plain.chat_tokens("tools", request))
    assert text.startswith("<|im_start|>system\nBe exact.\n\nYou can call these tools.")
    assert "<tool_call>" in text and '"name": "calc"' in text
    with pytest.raises(ChatTemplateError, match="JSON"):
        plain.chat_tokens("tools", "calc")


def test_unknown_role_and_bad_template_are_clear_errors(tmp_path: Path) -> None:
    tok = ModelTokenizer(write_model(tmp_path / "a", CHATML_TEMPLATE))
    with pytest.raises(ChatTemplateError, match="unknown chat role 'narrator'"):
        tok.chat_tokens("narrator", "x")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ModelTokenizer(write_model(tmp_path / "b", "{% for m in messages %}"))


def test_sandbox_blocks_template_escapes(tmp_path: Path) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match=r"unsafe|access"):
        ModelTokenizer(write_model(tmp_path, evil))


def test_vocab_bytes_round_trip_and_specials(tmp_path: Path) -> None:
    tok = ModelTokenizer(write_model(tmp_path, CHATML_TEMPLATE))
    ids, pieces = tok.vocabs()
    assert ids == list(range(tok.vocab_size))
    text = "Héllo wörld {\"a\": 1}\n\tend"
    assert b"".join(pieces[i] for i in tok.encode(text)).decode() == text
    special_ids, special_text = tok.special_tokens()
    assert special_text[special_ids.index(2)] == b"<|im_end|>"
    assert tok.decode(tok.encode("<|im_start|>user")) == "<|im_start|>user"
