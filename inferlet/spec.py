"""Speculative decoding: a drafter proposes tokens, one pass verifies them all.

A `Speculator` is any object with:

- `draft() -> (tokens, positions)`: tokens it guesses come next, with their
  absolute positions (`[]` positions means "right after the last token");
- `accept(tokens)`: the tokens the model actually produced this step (the
  verified drafts plus one bonus token);
- `rollback(n)`: `n` of the last drafts were rejected;
- `reset()`.

The Generator verifies drafts with the model's own sampler at every draft
row, keeps the longest prefix the model agrees with plus the next token, and
truncates the rejected drafts' KV. With `Sampler.argmax()` the output is
identical to plain greedy decoding.

`NgramSpeculator` is prompt lookup: find the most recent earlier occurrence
of the last `n` tokens and propose what followed it. It also backs
`system_speculation=True`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Speculator(Protocol):
    def draft(self) -> tuple[list[int], list[int]]: ...
    def accept(self, tokens: list[int]) -> None: ...
    def rollback(self, n: int) -> None: ...
    def reset(self) -> None: ...


class NgramSpeculator:
    """Prompt-lookup drafting over the tokens seen so far (the prompt, then accepted tokens)."""

    def __init__(self, history: Iterable[int] = (), *, ngram: int = 3, max_draft: int = 4,
                 start_position: int | None = None) -> None:
        if ngram < 1 or max_draft < 1:
            raise ValueError(f"ngram and max_draft must be >= 1, got {ngram} and {max_draft}")
        self.ngram = ngram
        self.max_draft = max_draft
        self._initial = list(history)
        self._start = start_position
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = []
        # n -> n-gram -> start of its most recent occurrence that has a following token
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(1, self.ngram + 1)}
        self.observe(self._initial)

    def observe(self, tokens: Iterable[int]) -> None:
        """Extend the history with tokens that entered the context (e.g. a prompt)."""
        h = self.history
        for t in tokens:
            # The n-grams ending at the current last token now have a continuation: index them.
            for n, index in self._index.items():
                if len(h) >= n:
                    index[tuple(h[-n:])] = len(h) - n
            h.append(int(t))

    def accept(self, tokens: list[int]) -> None:
        self.observe(tokens)

    def rollback(self, n: int) -> None:
        """Rejected drafts never entered `history`: nothing to undo."""

    def draft(self) -> tuple[list[int], list[int]]:
        h = self.history
        for n in range(min(self.ngram, len(h)), 0, -1):
            start = self._index[n].get(tuple(h[-n:]))
            if start is not None:
                follow = h[start + n:start + n + self.max_draft]
                return follow, self._positions(len(follow))
        return [], []

    def _positions(self, count: int) -> list[int]:
        """Positions after the last history token, when the caller told us where the history starts."""
        if self._start is None:
            return []
        first = self._start + len(self.history)
        return list(range(first, first + count))
