"""What the scheduler works with: a pass (`Job`), the chunk of it one batch computes, the page
operations a batch carries, and the scheduler's counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import NamedTuple

from pie.engine.batch import OutputSpec, OutputValue
from pie.runtime.context import Context
from pie.runtime.prefix_trie import PageKey


@dataclass(eq=False, slots=True)
class Job:
    """One forward pass on one context: rows are the context's slots [start, end)."""

    ctx: Context
    start: int
    end: int
    outputs: list[OutputSpec]  # index = row within the pass
    attention_mask: list[list[int]] | None = None  # one row per pass row, each covering `end` slots
    logit_mask: list[int] | None = None
    adapter: int | None = None
    seed: int | None = None
    future: asyncio.Future[list[OutputValue]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    results: list[OutputValue | None] = field(default_factory=list)
    _order: list[int] = field(default_factory=list)  # output ids by row
    _next: int = 0  # outputs in _order before this were scheduled
    missed_at: int = -1  # computed_len when the prefix trie last missed: no lookups past it
    computing: PageKey | None = None  # the uncached page this pass computes first (others wait for it)
    admitted_build: int = -1  # build (context-clock tick) that last admitted a chunk of this pass

    def __post_init__(self) -> None:
        outputs = self.outputs
        self.results = [None] * len(outputs)
        self._order = list(range(len(outputs)))
        if len(outputs) > 1:
            self._order.sort(key=lambda i: outputs[i].index)

    def next_output_slot(self) -> int:
        """The slot of the first output not yet scheduled (the pass's end if none)."""
        return self.start + self.outputs[self._order[self._next]].index if self._next < len(self._order) else self.end


class Chunk(NamedTuple):
    job: Job
    start: int
    end: int
    output_ids: list[int]


@dataclass(slots=True)
class PageOps:
    """The page operations of the batch being built; the engine runs them before its forward, in this order."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device page, host slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device page)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src page, dst page)


@dataclass
class SchedulerStats:
    batches: int = 0
    tokens_processed: int = 0
    last_batch_ms: float = 0.0
    suspensions: int = 0
    cached_tokens: int = 0  # prompt tokens attached from the prefix trie instead of computed
    swapped_out_pages: int = 0  # pages suspensions copied to the host swap pool
    swapped_in_pages: int = 0  # pages copied back from it
    recomputed_suspensions: int = 0  # suspensions that dropped computed KV the context must recompute
