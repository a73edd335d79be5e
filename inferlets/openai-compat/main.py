"""openai-compat: the generation behind the server's HTTP APIs (OpenAI chat/completions, Anthropic
Messages, OpenAI Responses).

The server validates a request and renders its prompt to token ids
(pie/server/api/), then launches this inferlet with a plan:

    {"model": str, "prompts": [[int, ...], ...], "n": int, "max_tokens": int,
     "sampler": {"temperature", "top_p", "top_k", "min_p"}, "seed": int | null,
     "stop": [str], "stop_token_ids": [int], "ignore_eos": bool, "min_tokens": int,
     "logprobs": int | null, "constraint": null | {"json_schema": {...}} | {"lark": str},
     "render_special": bool, "stream": bool, "save": str | null, "prompt_logprobs": int | null,
     "tokens": bool, "text": bool, "images": [[row, base64, "image" | "audio"], ...]}

`images` are the first prompt's images and audio clips: each one's placeholder tokens start at `row` of
the prompt.

With `stream` it first sends `{"started": true}`, then one message per generation step.

Every prompt is prefilled once (all but its last token) and forked `n`
times, so `n` choices cost one prefill. Choice `p * n + j` is fork `j` of
prompt `p`. While streaming it sends `{"i": choice, "delta": text,
"logprobs": [...]}` messages (one per step, `delta` may be empty); it returns `{"choices": [{"index", "text",
"finish_reason", "completion_tokens", "logprobs", "stop_string"}], "prompt_tokens": [...]}`.
A logprobs entry is `[token, logprob, [[token, logprob], ...]]` from the raw
logits row (before temperature and masks), the row the sampler read.
`save` names a snapshot to keep the first choice's context under (the
Responses API continues a conversation from it). `prompt_logprobs` scores the
prompt tokens too (completions' `echo` with `logprobs`); `max_tokens` 0 then
only scores. `tokens` adds the token ids to every message and choice; with
`text` false nothing is decoded (harmony models: the server parses the tokens).
With `prompt_logprobs` and `stream`, each choice's `{"i", "prompt_logprobs": [...]}` message comes
right after the prefill, before its first delta.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from inferlet import (
    Audio,
    Context,
    Distribution,
    Ebnf,
    Image,
    JsonSchema,
    Logits,
    Logprob,
    Model,
    brle,
    chat,
    session,
)

PROMPT_CHUNK = 128  # prompt rows scored per pass (echo with logprobs)


@dataclass(frozen=True, slots=True)
class PlanSampler:
    """The SDK's sampler shape with top-k, top-p and min-p together (the host applies all three), plus
    OpenAI's penalties and logit bias; a Generator hands a penalizing sampler its history each step."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    draws: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    history: tuple[int, ...] = ()

    @property
    def is_argmax(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def with_history(self, tokens: list[int]) -> PlanSampler:
        return replace(self, history=tuple(tokens))

    def to_dict(self) -> dict[str, Any]:
        kind = "argmax" if self.is_argmax else "top_k_top_p"
        out: dict[str, Any] = {"kind": kind, "temperature": self.temperature, "top_k": self.top_k,
                               "top_p": self.top_p, "min_p": self.min_p, "draws": 1}
        if self.penalizes:
            out |= {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                    "repetition_penalty": self.repetition_penalty, "penalty_tokens": list(self.history)}
        if self.logit_bias:
            out["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        return out


class MinTokens:
    """A constraint that forbids the stop tokens until `count` tokens were generated."""

    def __init__(self, count: int, stops: list[int], vocab_size: int) -> None:
        self._left = count
        self._mask = brle.not_(brle.from_tokens(vocab_size, stops)) if stops else []

    def step(self, accepted: list[int]) -> list[int]:
        self._left -= len(accepted)
        return self._mask if self._left > 0 else []


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    stop_string: str | None = None  # the stop string that ended the text, if one did
    prompt_logprobs: list[Any] = field(default_factory=list)  # entries for prompt tokens 1.. (echo)
    tokens: list[int] = field(default_factory=list)  # the generated ids, when the plan asks for them


async def main(input: dict) -> str:
    if input.get("stream"):
        session.send(json.dumps({"started": True}))  # the server's queue-time metric ends here
    model = Model.load(input.get("model", ""))
    n = int(input.get("n", 1))
    prompts = [list(p) for p in input["prompts"]]
    images = [(int(item[0]), base64.b64decode(item[1]), str(item[2]) if len(item) > 2 else "image")
              for item in input.get("images") or []]
    groups = await asyncio.gather(*(run_prompt(model, input, tokens, p * n, n, images if p == 0 else [])
                                    for p, tokens in enumerate(prompts)))
    choices = [c for group in groups for c in group]
    return json.dumps({"choices": [c.__dict__ for c in choices], "prompt_tokens": [len(p) for p in prompts]})


async def run_prompt(model: Model, input: dict, tokens: list[int], first: int, n: int,
                     images: list[tuple[int, bytes, str]]) -> list[Choice]:
    base = Context(model)
    top = input.get("prompt_logprobs")
    if top is None:
        fill(base, model, tokens[:-1], images)
        await base.flush()  # the prefill, once for all n choices
        prompt_logprobs: list[Any] = []
    else:
        prompt_logprobs = await prefill_scored(base, tokens, int(top))
        if input.get("stream"):  # the echo chunk of each choice carries them, before any generated text
            for j in range(n):
                session.send(json.dumps({"i": first + j, "prompt_logprobs": prompt_logprobs}))
    if int(input["max_tokens"]) == 0:  # scoring only (echo): nothing to generate
        base.release()
        return [Choice(first + j, finish_reason="length", prompt_logprobs=prompt_logprobs) for j in range(n)]
    contexts = [base] if n == 1 else [base.fork() for _ in range(n)]
    for ctx in contexts:
        ctx.append(tokens[-1:])
    seed = input.get("seed")
    results = await asyncio.gather(*(
        generate(ctx, input, first + j, None if seed is None else int(seed) + j)
        for j, ctx in enumerate(contexts)))
    for result in results:
        result.prompt_logprobs = prompt_logprobs
    if input.get("save"):
        contexts[0].save(str(input["save"]))
    for ctx in contexts:
        ctx.release()
    if n > 1:
        base.release()
    return list(results)


async def generate(ctx: Context, input: dict, index: int, seed: int | None) -> Choice:
    model = ctx.model
    given = input["sampler"]
    sampler = PlanSampler(float(given["temperature"]), int(given["top_k"]), float(given["top_p"]),
                          float(given["min_p"]), presence_penalty=float(given.get("presence_penalty", 0.0)),
                          frequency_penalty=float(given.get("frequency_penalty", 0.0)),
                          repetition_penalty=float(given.get("repetition_penalty", 1.0)),
                          logit_bias=tuple((int(t), float(b)) for t, b in given.get("logit_bias") or []))
    max_tokens = int(input["max_tokens"])
    stop_ids = [int(t) for t in input.get("stop_token_ids") or []]
    stops = stop_ids if input.get("ignore_eos") else sorted(set(model.eos_tokens()) | set(stop_ids))
    constraints: list[Any] = []
    spec = input.get("constraint")
    if spec and "json_schema" in spec:
        constraints.append(JsonSchema(spec["json_schema"]).build_constraint(model))
    elif spec and "lark" in spec:
        constraints.append(Ebnf(spec["lark"]).build_constraint(model))
    if int(input.get("min_tokens") or 0) > 0:
        constraints.append(MinTokens(int(input["min_tokens"]), stops, model.vocab_size))
    gen = ctx.generate(sampler, max_tokens=max_tokens, stop=stops, constrain=constraints or None, seed=seed,
                       auto_flush=False)
    top = input.get("logprobs")
    probe = None
    if top is not None:
        gen.disable_system_speculation()  # one logits row per step: the row each token was sampled at
        probe = gen.probe_each_step(-1, Logits())
    choice = Choice(index)
    want_tokens, want_text = bool(input.get("tokens")), input.get("text", True) is not False
    decoder = chat.TextStream(model, render_special=bool(input.get("render_special"))) if want_text else None
    stop_strings = [str(s) for s in input.get("stop") or []]
    stream = bool(input.get("stream"))
    text, sent, stopped = "", 0, False
    async for step in gen:
        out = await step.execute()
        new: list[Any] = []
        if probe is not None and out.tokens:
            row = out.logits(probe)
            if row is not None:
                new = [token_logprobs(row, out.tokens[0], int(top))]
        choice.logprobs += new
        step_tokens = list(out.tokens) if want_tokens else []
        choice.tokens += step_tokens
        if decoder is not None:
            text += decoder.push(out.tokens)
        cut = first_stop(text, stop_strings)
        if cut is not None:
            choice.stop_string = next(s for s in stop_strings if text.find(s) == cut)
            text, stopped = text[:cut], True
            if stream:
                send(index, text[sent:], new, step_tokens)
            break
        safe = len(text) - held_back(text, stop_strings)
        if stream:  # every step, even without text: the server times tokens by these messages
            send(index, text[sent:safe], new, step_tokens)
        sent = max(sent, safe)
    if not stopped and decoder is not None:
        text += decoder.finish()
        if stream and len(text) > sent:
            send(index, text[sent:], [], [])
    choice.text = text
    choice.completion_tokens = gen.tokens_generated
    choice.finish_reason = "length" if not stopped and gen.tokens_generated >= max_tokens else "stop"
    return choice


def fill(ctx: Context, model: Model, tokens: list[int], images: list[tuple[int, bytes, str]]) -> None:
    """The prompt's tokens into the buffer, each image or audio clip (row of its first token, bytes, kind)
    in its place."""
    at = 0
    for row, data, kind in sorted(images, key=lambda image: image[0]):
        # prepared by the server already: found by its content hash
        image = Audio.from_bytes(model, data) if kind == "audio" else Image.from_bytes(model, data)
        ctx.append(tokens[at:row]).buffer_images([image])
        at = row + image.token_count
    ctx.append(tokens[at:])


async def prefill_scored(ctx: Context, tokens: list[int], top: int) -> list[Any]:
    """Prefill all but the last prompt token, scoring each prompt token after the first: row i's
    distribution gives token i + 1 its logprob (and the `top` most likely there). In passes of
    PROMPT_CHUNK rows, so no pass carries more output slots than a decode batch would."""
    entries: list[Any] = []
    body = tokens[:-1]
    for start in range(0, len(body), PROMPT_CHUNK):
        rows = body[start:start + PROMPT_CHUNK]
        fwd = ctx.forward().input(rows)
        scored = [(fwd.probe(i, Logprob(tokens[start + i + 1])),
                   fwd.probe(i, Distribution(1.0, top)) if top > 0 else None) for i in range(len(rows))]
        out = await fwd.execute()
        for i, (lp, dist) in enumerate(scored):
            value = out.logprobs(lp)
            best: list[list[Any]] = []
            if dist is not None:
                ids, probs = out.distribution(dist) or ([], [])
                best = [[int(t), math.log(max(p, 1e-45))] for t, p in zip(ids, probs, strict=True)]  # JSON: no -inf
            entries.append([tokens[start + i + 1], float(value[0]) if value else None, best])
    return entries


def token_logprobs(row: bytes, token: int, top: int) -> list[Any]:
    """[token, its logprob, the `top` most likely [token, logprob]] of one raw logits row."""
    logits = np.frombuffer(row, dtype="<f4").astype(np.float64)
    peak = float(logits.max())
    logz = peak + math.log(float(np.exp(logits - peak).sum()))
    best: list[list[Any]] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [[int(t), float(logits[t] - logz)] for t in ids]
    return [int(token), float(logits[token] - logz), best]


def send(index: int, piece: str, logprobs: list[Any], tokens: list[int]) -> None:
    message: dict[str, Any] = {"i": index, "delta": piece, "logprobs": logprobs}
    if tokens:
        message["tokens"] = tokens
    session.send(json.dumps(message))


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
