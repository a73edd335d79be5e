"""Attention sink + sliding window (StreamingLLM), written as explicit forward passes.

Every token attends to the first `sink` tokens and to the `window` most recent ones (itself included),
so the attention cost per token stays constant however long the text grows. A mask row is a BRLE over
the KV length after the pass, starting with a false run: [0, sink, gap, window, after].
"""

from inferlet import Context, Model, Sampler, brle, chat


def sink_window_row(slot: int, kv_len: int, sink: int, window: int) -> list[int]:
    """The mask of the token at `slot` in a pass that ends with `kv_len` slots (causal: nothing after it)."""
    seen = slot + 1
    after = kv_len - seen
    if seen <= sink + window:
        return [0, seen, after] if after else brle.all_true(seen)
    row = [0, sink, seen - sink - window, window]
    return [*row, after] if after else row


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    sink = int(input.get("sink", 4))
    window = int(input.get("window", 64))
    max_tokens = int(input.get("max_tokens", 64))
    stops = set(model.eos_tokens())
    prompt = str(input.get("prompt", ""))
    feed = chat.system(model, "You are a helpful assistant.") + chat.user(model, prompt) + chat.cue(model)

    ctx = Context(model)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        start = ctx.seq_len
        kv_len = start + len(feed)
        fwd = ctx.forward().input(feed)
        fwd.attention_mask([sink_window_row(start + i, kv_len, sink, window) for i in range(len(feed))])
        handle = fwd.sample([len(feed) - 1], Sampler.argmax())
        token = (await fwd.execute()).token(handle)
        if token in stops:
            break
        tokens.append(token)
        feed = [token]
    return {"text": model.tokenizer().decode(tokens), "tokens": tokens, "kv_len": ctx.seq_len}
