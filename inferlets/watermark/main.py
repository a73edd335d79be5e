"""Green-list watermarking: sample by hand from the probed next-token distribution after boosting the
"green" tokens, a pseudo-random half of the vocabulary chosen by the previous token and a key.

Generate: each step clears the generator's sampler, reads the top-k distribution probe, multiplies
green probabilities by e^delta, renormalises and samples with a seeded RNG, then `accept`s the token.
Detect: count green tokens; z = (green - gamma*T) / sqrt(T*gamma*(1-gamma)). Watermarked text scores a
high z, ordinary text about 0.
"""

import hashlib
import json
import math
import random

from inferlet import Context, Distribution, Model, Sampler


def is_green(previous: int, token: int, key: int, gamma: float) -> bool:
    digest = hashlib.blake2b(f"{key}:{previous}:{token}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < gamma


def z_score(tokens: list[int], key: int, gamma: float) -> tuple[float, int]:
    scored = len(tokens) - 1
    if scored < 1:
        return 0.0, 0
    green = sum(is_green(tokens[i - 1], tokens[i], key, gamma) for i in range(1, len(tokens)))
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma)), green


async def generate(model: Model, input: dict, key: int, gamma: float) -> dict:
    delta = float(input.get("delta", 2.0))
    rng = random.Random(int(input.get("seed", 0)))
    ctx = Context(model)
    ctx.system("You are a helpful assistant.").user(str(input.get("prompt", "")))
    gen = ctx.generate(Sampler.argmax(), max_tokens=int(input.get("max_tokens", 64)))
    tokens: list[int] = []
    previous = -1
    async for step in gen:
        step.clear_sampler()
        handle = step.probe(len(step.pending) - 1, Distribution(temperature=1.0, k=0))
        ids, probs = (await step.execute()).distribution(handle)
        weights = [p * (math.exp(delta) if is_green(previous, t, key, gamma) else 1.0) for t, p in zip(ids, probs, strict=True)]
        token = rng.choices(ids, weights=weights)[0]
        kept = gen.accept([token])
        tokens += kept
        previous = token
    z, green = z_score(tokens, key, gamma)
    return {"text": model.tokenizer().decode(tokens), "tokens": tokens, "z": z, "green": green}


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    key = int(input.get("key", 15485863))
    gamma = float(input.get("gamma", 0.5))
    if input.get("mode", "generate") == "generate":
        return await generate(model, input, key, gamma)
    tokens = input.get("tokens")
    if isinstance(tokens, str):
        tokens = json.loads(tokens)
    if tokens is None:
        tokens = model.tokenizer().encode(str(input.get("text", "")))
    z, green = z_score([int(t) for t in tokens], key, gamma)
    return {"z": z, "green": green, "scored": max(len(tokens) - 1, 0), "watermarked": z > 4.0}
