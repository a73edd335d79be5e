"""Chat-formatted completion: system + user turn, then generate until the end of the turn."""

from inferlet import Context, Model, Sampler, chat, session


async def main(input: dict) -> str:
    prompt = input.get("prompt") or input.get("input") or ""
    model = Model.load(input.get("model", ""))
    temperature = float(input.get("temperature", 0.0))
    sampler = Sampler.top_p(temperature, float(input.get("top_p", 0.95))) if temperature > 0 else Sampler.argmax()

    ctx = Context(model)
    ctx.system(input.get("system", "You are a helpful assistant.")).user(str(prompt))
    seed = input.get("seed")
    gen = ctx.generate(sampler, max_tokens=int(input.get("max_tokens", 256)),
                       seed=None if seed is None else int(seed))
    if not input.get("stream"):
        return await gen.collect_text()

    decoder = chat.Decoder(model)
    parts = []
    async for step in gen:
        event = decoder.feed((await step.execute()).tokens)
        if isinstance(event, chat.Event.Delta):
            parts.append(event.text)
            session.send(event.text)
    tail = decoder.finish()
    if tail:
        parts.append(tail)
        session.send(tail)
    return "".join(parts)
