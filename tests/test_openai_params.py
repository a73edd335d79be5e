"""Every parameter of the OpenAI API honoured or refused, against a real `pie serve` on the tiny random
model with the official `openai` client: limits, errors, constrained output, logprobs, n, token ids."""

from __future__ import annotations

import json
import math
import random

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from inferlet_helpers import run_sdk
from server_support import MODEL, pages_used, running_server

from inferlet import Context, Distribution, Model
from pie.server.api.served import served_model
from pie.server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="module")
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> Server:
    async with running_server() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(server: Server) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def _runtime(server: Server):  # type: ignore[no-untyped-def]
    assert server.state is not None
    return server.state.runtime


# -- errors and limits ----------------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_json_errors(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        missing = await http.get("/v1/nothing")
        wrong = await http.get("/v1/chat/completions")
        broken = await http.post("/v1/chat/completions", content=b"{not json")
        deep = await http.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and "POST" in wrong.json()["error"]["message"]
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert deep.status_code == 400 and "nested too deep" in deep.json()["error"]["message"]
    for response in (missing, wrong, broken, deep):
        assert response.headers["Content-Type"].startswith("application/json")
        assert "Traceback" not in response.text


async def test_out_of_range_values_are_400s_naming_them(client: openai.AsyncOpenAI) -> None:
    cases = [({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
             ({"extra_body": {"top_k": -5}}, "top_k"), ({"extra_body": {"min_p": 1.5}}, "min_p"),
             ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
             ({"logit_bias": {"5": 300}}, "logit_bias[5]"), ({"extra_body": {"repetition_penalty": 0}},
                                                            "repetition_penalty"),
             ({"extra_body": {"best_of": 2}}, "best_of"), ({"reasoning_effort": "low"}, "reasoning_effort"),
             ({"extra_body": {"made_up": 1}}, "made_up"), ({"extra_body": {"stop_token_ids": [10**6]}},
                                                           "stop_token_ids")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == param, (kwargs, body)
        assert param in body["message"] and "Traceback" not in body["message"]


async def test_context_length_is_checked_with_the_numbers(client: openai.AsyncOpenAI, server: Server) -> None:
    served = served_model(_runtime(server), MODEL)
    assert served is not None and served.max_model_len > 0
    limit = served.max_model_len
    models = [m async for m in client.models.list()]
    assert models[0].model_extra["max_model_len"] == limit
    one = await client.models.retrieve(MODEL)
    assert one.id == MODEL and one.model_extra["max_model_len"] == limit
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4o")
    long_prompt = [5] * (limit - 10)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=20)
    message = caught.value.body["message"]  # type: ignore[index]
    assert f"maximum context length is {limit} tokens" in message
    assert f"you requested {limit + 10} tokens ({limit - 10} in the prompt, 20 in the completion)" in message
    assert caught.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        await client.completions.create(model=MODEL, prompt=[5] * (limit + 2))
    # Without max_tokens the completion fills what is left of the context (here 4 tokens at most).
    fits = await client.completions.create(model=MODEL, prompt=[5] * (limit - 4), temperature=0,
                                           extra_body={"ignore_eos": True})
    assert fits.usage is not None and fits.usage.completion_tokens == 4 and fits.choices[0].finish_reason == "length"
    assert pages_used(server) == 0


# -- constrained output ---------------------------------------------------------------------------

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "maxItems": 3}, "ok": {"type": "boolean"}},
     "required": ["tags", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                 "y": {"type": "number"}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}},
     "required": ["point", "label"], "additionalProperties": False},
]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
async def test_json_schema_output_always_parses_and_validates(client: openai.AsyncOpenAI, index: int) -> None:
    schema = SCHEMAS[index]
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    for seed in random.Random(index).sample(range(10_000), 3):
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt,  # type: ignore[arg-type]
                                                     max_tokens=200, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON schema with bounded sizes (every value fits in a few dozen tokens)."""
    kinds = ["string", "integer", "boolean", "enum", "number"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    names = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


@pytest.mark.parametrize("seed", [101, 202, 303, 404, 505])
async def test_random_json_schemas_always_validate(client: openai.AsyncOpenAI, seed: int) -> None:
    rng = random.Random(seed)
    schema = {"type": "object", "properties": {"x": random_schema(rng), "y": random_schema(rng)},
              "required": ["x", "y"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    for sample_seed in (seed, seed + 1):
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt,  # type: ignore[arg-type]
                                                     max_tokens=300, temperature=1.0, seed=sample_seed)
        assert reply.choices[0].finish_reason == "stop", (schema, reply.choices[0].message.content)
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


async def test_json_object_is_an_object(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                                 max_tokens=120, temperature=0.7, seed=3)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string", "maxLength": 20},
                                                                         "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
                                                          "required": ["city", "days"],
                                                          "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", "named"])
async def test_forced_tool_calls_parse_and_validate(client: openai.AsyncOpenAI, choice: str) -> None:
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "add"}}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in (1, 2, 3):
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
                                                     tool_choice=tool_choice, max_tokens=160, temperature=1.0,
                                                     seed=seed, parallel_tool_calls=False)
        result = reply.choices[0]
        assert result.finish_reason == "tool_calls" and result.message.tool_calls
        assert len(result.message.tool_calls) == 1
        call = result.message.tool_calls[0]
        assert choice == "required" or call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


async def test_forced_tool_call_streams(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
                                                  tool_choice={"type": "function",
                                                               "function": {"name": "get_weather"}},
                                                  max_tokens=160, temperature=0, stream=True)
    chunks = [c async for c in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name == "get_weather", chunks[-1]
    jsonschema.validate(json.loads(calls[0].function.arguments or ""), TOOLS[0]["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- sampling parameters --------------------------------------------------------------------------


async def test_n_choices_share_one_prefill(client: openai.AsyncOpenAI, server: Server) -> None:
    prompt = random.Random(11).sample(range(20, 500), 40)  # a prompt no earlier request cached
    before = sum(m.tokens_processed for m in _runtime(server).models())
    reply = await client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=5, temperature=1.0,
                                            seed=9, extra_body={"ignore_eos": True})
    processed = sum(m.tokens_processed for m in _runtime(server).models()) - before
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.prompt_tokens == 40 and reply.usage.completion_tokens == 15
    # One prefill of the first 39 prompt tokens; each fork then runs its own 5 tokens (the last prompt
    # token and its first 4 samples). Three separate requests would run 3 * 44.
    assert processed == 39 + 3 * 5
    texts = {c.text for c in reply.choices}
    assert len(texts) > 1  # forks draw with different seeds
    again = await client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=5, temperature=1.0,
                                            seed=9, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


async def test_list_and_token_prompts(client: openai.AsyncOpenAI, server: Server) -> None:
    served = served_model(_runtime(server), MODEL)
    assert served is not None
    ids = served.encode("The cat")
    by_text = await client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0)
    by_ids = await client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    both = await client.completions.create(model=MODEL, prompt=["The cat", "A dog"], max_tokens=6, temperature=0,
                                           n=2)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == by_text.choices[0].text
    echoed = await client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "The cat" + by_text.choices[0].text


async def test_min_tokens_stop_token_ids_and_ignore_eos(client: openai.AsyncOpenAI, server: Server) -> None:
    longer = await client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert longer.usage is not None and longer.usage.completion_tokens == 12
    floor = await client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=12, temperature=0,
                                            extra_body={"min_tokens": 12})
    assert floor.usage is not None and floor.usage.completion_tokens == 12
    chat = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                                logprobs=True)
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    served = served_model(_runtime(server), MODEL)
    assert served is not None and served.tokenizer is not None
    vocab = {piece: i for i, piece in enumerate(served.tokenizer.vocabs()[1])}
    first = vocab[bytes(chat.choices[0].logprobs.content[0].bytes or [])]  # the first greedy token
    stopped = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                                   extra_body={"stop_token_ids": [first]})
    assert stopped.usage is not None and stopped.usage.completion_tokens == 0
    assert stopped.choices[0].finish_reason == "stop"


async def test_logprobs_equal_the_distribution_probe(client: openai.AsyncOpenAI, server: Server) -> None:
    runtime = _runtime(server)
    served = served_model(runtime, MODEL)
    assert served is not None
    prompt = served.render_chat(HELLO, None)

    async def probe() -> tuple[list[int], list[float]]:
        ctx = Context(Model.load(MODEL))
        ctx.append(prompt[:-1])
        await ctx.flush()
        fwd = ctx.forward().input(prompt[-1:])
        handle = fwd.probe(0, Distribution(1.0, 5))
        out = await fwd.execute()
        dist = out.distribution(handle)
        assert dist is not None
        return dist

    ids, probs = await run_sdk(runtime, probe)  # type: ignore[arg-type]
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0,
                                                 logprobs=True, top_logprobs=5)
    assert reply.choices[0].logprobs is not None
    first = reply.choices[0].logprobs.content[0]  # type: ignore[index]
    assert [bytes(t.bytes or []) for t in first.top_logprobs] == [served.token_bytes(t) for t in ids]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx([math.log(p) for p in probs],
                                                                    abs=1e-4)
    assert bytes(first.bytes or []) == served.token_bytes(ids[0])  # greedy picked the most likely token
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob)
    completion = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                                 logprobs=5)
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] == pytest.approx(first.logprob, abs=1e-5)
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(
        [t.logprob for t in first.top_logprobs], abs=1e-5)


async def test_streamed_n_and_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0.8,
                                                  seed=4, n=2, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    whole = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0.8,
                                                 seed=4, n=2)
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == whole.choices[index].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_two_turn_tool_loop_streams(client: openai.AsyncOpenAI) -> None:
    messages: list[dict] = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    stream = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                  max_tokens=160, temperature=0, stream=True)
    calls = [tc for c in [c async for c in stream] if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function is not None
    call = {"id": calls[0].id, "type": "function",
            "function": {"name": calls[0].function.name, "arguments": calls[0].function.arguments}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    answer = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                                  tool_choice="none", max_tokens=6, temperature=0, stream=True)
    chunks = [c async for c in answer]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


async def test_echo_scores_the_prompt(client: openai.AsyncOpenAI) -> None:
    prompt = [31, 47, 112, 9]
    free = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=3)
    assert free.choices[0].logprobs is not None and free.choices[0].logprobs.token_logprobs is not None
    greedy = free.choices[0].logprobs.token_logprobs[0]
    # Score the prompt and one more token without generating. The alternatives after the prompt (from the
    # prompt pass's probes) match what the decode step reported when it sampled greedily there.
    scored = await client.completions.create(model=MODEL, prompt=[*prompt, 5], max_tokens=0, echo=True,
                                             logprobs=3)
    lp = scored.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(lp.top_logprobs[4].values()) == pytest.approx(greedy, abs=1e-4)
    # (keyed by token text: tokens whose bytes decode alike share a key, so up to 3)
    assert lp.token_logprobs[4] <= greedy + 1e-4 and all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert scored.usage is not None and scored.usage.completion_tokens == 0


async def test_echo_with_logprobs_streams(client: openai.AsyncOpenAI) -> None:
    """The streamed echo carries the prompt's logprobs in its first chunk, equal to the whole response's."""
    kwargs = {"model": MODEL, "prompt": [31, 47, 112, 9], "max_tokens": 3, "temperature": 0, "echo": True,
              "logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = await client.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = [c async for c in await client.completions.create(stream=True, **kwargs)]  # type: ignore[call-overload]
    first = chunks[0].choices[0]
    assert first.logprobs is not None and first.logprobs.token_logprobs is not None
    assert first.text == whole.choices[0].text[:len(first.text)] and len(first.logprobs.token_logprobs) == 4
    tokens: list[str] = []
    logprobs: list[float | None] = []
    offsets: list[int] = []
    for chunk in chunks:
        lp = chunk.choices[0].logprobs
        if lp is not None and lp.tokens:
            tokens += lp.tokens
            logprobs += lp.token_logprobs or []
            offsets += lp.text_offset or []
    expected = whole.choices[0].logprobs
    assert expected is not None and tokens == expected.tokens and offsets == expected.text_offset
    assert logprobs[0] is None and expected.token_logprobs is not None
    assert logprobs[1:] == pytest.approx(expected.token_logprobs[1:], abs=1e-4)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


# -- penalties and logit bias -----------------------------------------------------------------------


async def test_logit_bias_and_penalties_reach_the_sampler(client: openai.AsyncOpenAI) -> None:
    plain = await client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    biased = await client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0,
                                             logit_bias={"42": 8}, extra_body={"ignore_eos": True})
    assert biased.usage is not None and biased.usage.completion_tokens == 12
    assert biased.choices[0].text != plain.choices[0].text and len(set(biased.choices[0].text)) == 1
    # +8 on one token makes greedy pick it every step (the random model's logits are a few units), until a
    # frequency penalty (2 per occurrence, counted over what was generated) pushes it back down.
    penalized = await client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=12, temperature=0,
                                                logit_bias={"42": 8}, frequency_penalty=2.0,
                                                extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert penalized.choices[0].text != biased.choices[0].text
    for bad in ({"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"logit_bias": {"x": 1}},
                {"logit_bias": {"1": 500}}, {"logit_bias": {"99999999": 1}}):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **bad)  # type: ignore[arg-type]
        assert caught.value.body["param"].split("[")[0] in bad  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                        extra_body={"repetition_penalty": 0})
