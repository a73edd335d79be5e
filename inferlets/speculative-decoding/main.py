"""Speculative decoding with a prompt-lookup drafter.

The drafter implements the SDK's Speculator protocol: it finds the most recent earlier occurrence of
the last n tokens (prompt and output so far) and proposes what followed. Each step verifies all drafts
in one pass; with the greedy sampler the accepted tokens are exactly what greedy decoding would give.
"""

from inferlet import Context, Model, Sampler, chat


class PromptLookup:
    def __init__(self, history: list[int], ngram: int, draft_len: int) -> None:
        self.history = list(history)
        self.ngram = ngram
        self.draft_len = draft_len
        self.drafted = 0
        self.accepted = 0

    def draft(self) -> tuple[list[int], list[int]]:
        h = self.history
        for n in range(min(self.ngram, len(h) - 1), 0, -1):
            tail = h[-n:]
            for start in range(len(h) - n - 1, -1, -1):
                if h[start:start + n] == tail:
                    drafts = h[start + n:start + n + self.draft_len]
                    self.drafted += len(drafts)
                    return drafts, []  # []: right after the last token
        return [], []

    def accept(self, tokens: list[int]) -> None:
        self.accepted += max(len(tokens) - 1, 0)  # all but the bonus token were drafts
        self.history.extend(tokens)

    def rollback(self, n: int) -> None:
        pass  # rejected drafts never entered the history

    def reset(self) -> None:
        pass


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    ctx = Context(model)
    ctx.system("You are a helpful assistant.").user(str(input.get("prompt", "")))
    prompt = ctx.buffer() + chat.cue(model)
    drafter = PromptLookup(prompt, int(input.get("ngram", 3)), int(input.get("draft_len", 4)))
    gen = ctx.generate(Sampler.argmax(), max_tokens=int(input.get("max_tokens", 128)), speculator=drafter)
    tokens, steps = [], 0
    async for step in gen:
        tokens += (await step.execute()).tokens
        steps += 1
    return {"text": model.tokenizer().decode(tokens), "tokens": tokens, "steps": steps,
            "drafted": drafter.drafted, "accepted": drafter.accepted}
