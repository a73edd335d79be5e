"""Tree of thoughts with forked contexts.

Each level, every kept node proposes `breadth` next thoughts in parallel forks (sampled with distinct
seeds). A thought is scored by the model's mean token log-probability (a Logprob probe of each token it
sampled, read on the same passes), the best `keep` survive, and the best leaf writes the answer.
Forks share the KV pages of everything above them, so the tree costs little more than its leaves.
"""

import asyncio
import math

from inferlet import Context, Distribution, Model, Sampler


async def propose(parent: Context, instruction: str, tokens: int, seed: int) -> tuple[float, str, Context]:
    """A fork of `parent` with one more thought; its score is the mean logprob of the thought's tokens."""
    ctx = parent.fork()
    ctx.user(instruction)
    gen = ctx.generate(Sampler.top_p(0.9, 0.95), max_tokens=tokens, seed=seed)
    probe = gen.probe_each_step(-1, Distribution(temperature=1.0, k=0))
    logprobs, text_tokens = [], []
    async for step in gen:
        out = await step.execute()
        ids, probs = out.distribution(probe)
        chosen = out.tokens_at(out.auto_sampler)
        if chosen:
            seen = dict(zip(ids, probs, strict=True))
            logprobs.append(_log(seen.get(chosen[0], 0.0)))
        text_tokens += out.tokens
    ctx.seal()
    score = sum(logprobs) / len(logprobs) if logprobs else float("-inf")
    return score, parent.model.tokenizer().decode(text_tokens), ctx


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -30.0  # outside the probed top-k: a floor, not -inf


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    depth, breadth = int(input.get("depth", 2)), int(input.get("breadth", 3))
    keep, seed = int(input.get("keep", 2)), int(input.get("seed", 0))
    thought_tokens = int(input.get("thought_tokens", 24))

    root = Context(model)
    root.system("Think step by step; each reply is one short step.").user(str(input.get("problem", "")))
    await root.flush()
    frontier = [(0.0, [], root)]  # (score, thoughts so far, context)
    tree = []
    for level in range(depth):
        jobs = [propose(ctx, "Next step?", thought_tokens, seed + 1000 * level + 10 * n + b)
                for n, (_, _, ctx) in enumerate(frontier) for b in range(breadth)]
        owners = [n for n in range(len(frontier)) for _ in range(breadth)]
        results = await asyncio.gather(*jobs)
        children = [(score, frontier[n][1] + [text], ctx) for (score, text, ctx), n in zip(results, owners, strict=True)]
        tree.append([{"thought": c[1][-1], "score": c[0], "parent": n} for c, n in zip(children, owners, strict=True)])
        children.sort(key=lambda c: -c[0])
        for _, _, ctx in frontier:
            ctx.release()
        for _, _, ctx in children[keep:]:
            ctx.release()
        frontier = children[:keep]
    best_score, thoughts, best = frontier[0]
    best.user("Now give the final answer.")
    answer = await best.generate(Sampler.argmax(), max_tokens=int(input.get("answer_tokens", 48))).collect_text()
    for _, _, ctx in frontier:
        ctx.release()
    return {"answer": answer, "thoughts": thoughts, "score": best_score, "tree": tree}
