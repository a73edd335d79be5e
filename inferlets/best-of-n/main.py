"""Best-of-N with parallel forks: the prompt is prefilled once, then each candidate decodes in its own
fork (sharing the prompt's KV pages), all concurrently. The pick is the candidate most similar to the
others (self-consistency), which needs no reward model."""

import asyncio
import difflib

from inferlet import Context, Model, Sampler


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    n = int(input.get("n", 4))
    max_tokens = int(input.get("max_tokens", 64))
    temperature = float(input.get("temperature", 0.8))
    seed = int(input.get("seed", 0))

    base = Context(model)
    base.system("You are a helpful assistant.").user(str(input.get("prompt", "")))
    await base.flush()  # one prefill of the conversation for all candidates

    async def candidate(i: int) -> str:
        with base.fork() as ctx:
            sampler = Sampler.top_p(temperature, 0.95) if temperature > 0 else Sampler.argmax()
            # generate() appends the generation cue to this fork's buffer: a few tokens per candidate.
            return await ctx.generate(sampler, max_tokens=max_tokens, seed=seed + i).collect_text()

    texts = list(await asyncio.gather(*(candidate(i) for i in range(n))))
    base.release()

    def consensus(i: int) -> float:
        return sum(difflib.SequenceMatcher(None, texts[i], texts[j]).ratio() for j in range(n) if j != i)

    best = max(range(n), key=consensus)
    return {"best": texts[best], "best_index": best, "candidates": texts}
