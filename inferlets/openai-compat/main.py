"""openai-compat: the generation behind the server's OpenAI-compatible API.

The server validates an OpenAI request (pie/server/openai_schema.py) and
launches this inferlet with it as input:

    {"mode": "chat" | "completion", "model": str, "messages": [{"role", "content"}], "prompt": str,
     "max_tokens": int, "temperature": float, "top_p": float, "stop": [str], "seed": int | null}

While generating it sends `{"delta": text}` messages (the server turns them
into SSE chunks) and returns
`{"text", "finish_reason": "stop" | "length", "prompt_tokens", "completion_tokens"}`.
Chat prompts go through the model's chat template and stop at its end-of-turn
tokens; completions stop at its end-of-sequence tokens. Stop strings end the
text before the first match; text that might begin a stop string is held
back until it cannot.
"""

from __future__ import annotations

import json

from inferlet import Context, Model, Sampler, chat, session


async def main(input: dict) -> str:
    model = Model.load(input.get("model", ""))
    ctx = Context(model)
    if input.get("mode") == "chat":
        for message in input.get("messages", []):
            getattr(ctx, message["role"])(message["content"])  # system / user / assistant
        generator = ctx.generate(sampler_for(input), max_tokens=input.get("max_tokens", 256),
                                 seed=input.get("seed"))
    else:
        ctx.append(model.tokenizer().encode(input.get("prompt", "")))
        generator = ctx.generate(sampler_for(input), max_tokens=input.get("max_tokens", 256),
                                 seed=input.get("seed"), stop=model.eos_tokens(), auto_flush=False)
    prompt_tokens = len(ctx.buffer())
    text, stopped = await stream_text(ctx, generator, input.get("stop") or [])
    length_cut = not stopped and generator.tokens_generated >= input.get("max_tokens", 256)
    return json.dumps({"text": text, "finish_reason": "length" if length_cut else "stop",
                       "prompt_tokens": prompt_tokens, "completion_tokens": generator.tokens_generated})


def sampler_for(input: dict) -> Sampler:
    temperature, top_p = float(input.get("temperature", 1.0)), float(input.get("top_p", 1.0))
    if temperature == 0.0:
        return Sampler.argmax()
    return Sampler.top_p(temperature, top_p) if top_p < 1.0 else Sampler.multinomial(temperature)


async def stream_text(ctx: Context, generator, stops: list[str]) -> tuple[str, bool]:
    """Generate, sending text as it becomes final; (all text, whether a stop string ended it)."""
    decoder = chat.TextStream(ctx.model)
    text, sent = "", 0
    async for step in generator:
        text += decoder.push((await step.execute()).tokens)
        cut = first_stop(text, stops)
        if cut is not None:
            send_delta(text[sent:cut])
            return text[:cut], True
        safe = len(text) - held_back(text, stops)
        send_delta(text[sent:safe])
        sent = max(sent, safe)
    text += decoder.finish()
    send_delta(text[sent:])
    return text, False


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def send_delta(piece: str) -> None:
    if piece:
        session.send(json.dumps({"delta": piece}))
