"""Multi-turn chat over the session: the KV cache of earlier turns is kept, each turn only adds to it.

Send user messages with the client's `signal`; an empty message or "/exit" ends the chat. Each reply
comes back as a message event; the return value is the transcript.
"""

from inferlet import Context, Model, Sampler, session


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    temperature = float(input.get("temperature", 0.0))
    sampler = Sampler.top_p(temperature, 0.95) if temperature > 0 else Sampler.argmax()
    max_tokens = int(input.get("max_tokens", 256))

    ctx = Context(model)
    ctx.system(input.get("system", "You are a helpful assistant."))
    transcript = []
    for _ in range(int(input.get("max_turns", 100))):
        message = await session.receive()
        if message.strip() in ("", "/exit"):
            break
        ctx.user(message)
        reply = await ctx.generate(sampler, max_tokens=max_tokens).collect_text()
        ctx.seal()  # close the assistant turn after the reply's last (still buffered) token
        session.send(reply)
        transcript.append({"user": message, "assistant": reply})
    return {"turns": transcript, "context_tokens": ctx.seq_len + len(ctx.buffer())}
