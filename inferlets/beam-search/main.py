"""Beam search: every beam is a context; each step reads the top-`beam_width` next tokens of every beam
(a Distribution probe), keeps the `beam_width` best extensions by total log-probability, and forks the
parents' KV for them (committed pages are shared, so a fork costs at most one page copy).

Ties break towards the lower beam index, then the lower token id. A beam that picks an end-of-turn
token is finished; the search ends when no beam is left or after `max_tokens`.
"""

import asyncio
import math

from inferlet import Context, Distribution, Model, chat


async def expand(ctx: Context, tokens: list[int], width: int) -> list[tuple[int, float]]:
    """Run `tokens` into the context's KV; the top-`width` (token, logprob) that may follow them."""
    fwd = ctx.forward().input(tokens)
    handle = fwd.probe(len(tokens) - 1, Distribution(temperature=1.0, k=width))
    ids, probs = (await fwd.execute()).distribution(handle)
    return [(t, math.log(p)) for t, p in zip(ids, probs, strict=True) if p > 0]


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    width = int(input.get("beam_width", 3))
    max_tokens = int(input.get("max_tokens", 16))
    stops = set(model.eos_tokens())
    prompt = str(input.get("prompt", ""))
    if input.get("raw"):
        prompt_tokens = model.tokenizer().encode(prompt)
    else:
        prompt_tokens = (chat.system(model, "You are a helpful assistant.") + chat.user(model, prompt)
                         + chat.cue(model))

    # A beam: (score, generated tokens, context, tokens not yet in its KV).
    beams = [(0.0, [], Context(model), prompt_tokens)]
    finished = []
    for _ in range(max_tokens):
        expansions = await asyncio.gather(*(expand(ctx, feed, width) for _, _, ctx, feed in beams))
        candidates = sorted(
            ((score + lp, b, tok) for b, (score, _, _, _) in enumerate(beams) for tok, lp in expansions[b]),
            key=lambda c: (-c[0], c[1], c[2]))
        next_beams = []
        for score, b, tok in candidates[:width]:
            tokens = beams[b][1] + [tok]
            if tok in stops:
                finished.append((score, tokens[:-1]))
            else:
                next_beams.append((score, tokens, beams[b][2].fork(), [tok]))
        for _, _, ctx, _ in beams:
            ctx.release()
        beams = next_beams
        if not beams:
            break
    for score, tokens, ctx, _ in beams:
        finished.append((score, tokens))
        ctx.release()
    finished.sort(key=lambda f: -f[0])
    score, tokens = finished[0]
    return {"text": model.tokenizer().decode(tokens), "tokens": tokens, "score": score,
            "prompt_tokens": prompt_tokens, "beams": [{"tokens": t, "score": s} for s, t in finished[:width]]}
