"""What the scheduler works with: a pass (`Job`), the chunk of it one batch computes, the page
operations a batch carries, and the scheduler's counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pie.engine.batch import OutputSpec, OutputValue
from pie.runtime.context import Context
from pie.runtime.prefix_trie import PageKey


class JobOwner(Protocol):
    """Who hears of a job's end instead of a future: a run-ahead stream (`pie.runtime.runahead`).

    Called synchronously by the scheduler while it hands a batch's results back, so the owner can
    submit its next pass before the next batch is built."""

    def completed(self, job: Job, results: list[OutputValue]) -> None: ...
    def failed(self, job: Job, error: BaseException) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One forward pass on one context: rows are the context's slots [start, end).

    It resolves its `future` (an instance awaits it), or, with an `owner`, calls the owner back and has
    no future; such a job is given up by setting `cancelled`."""

    ctx: Context
    start: int
    end: int
    outputs: list[OutputSpec]  # index = row within the pass
    attention_mask: list[list[int]] | None = None  # one row per pass row, each covering `end` slots
    logit_mask: list[int] | None = None
    adapter: int | None = None
    seed: int | None = None
    owner: JobOwner | None = None
    future: asyncio.Future[list[OutputValue]] | None = None  # made in __post_init__ when there is no owner
    cancelled: bool = False  # an owner's job that was given up
    results: list[OutputValue | None] = field(default_factory=list)
    _order: list[int] = field(default_factory=list)  # output ids by row
    _next: int = 0  # outputs in _order before this were scheduled
    missed_at: int = -1  # computed_len when the prefix trie last missed: no lookups past it
    computing: PageKey | None = None  # the uncached page this pass computes first (others wait for it)
    admitted_build: int = -1  # build (context-clock tick) that last admitted a chunk of this pass
    queued_at: float = 0.0  # the priority whose queue holds it (the context's priority when queued)
    zo_seed: int | None = None  # perturb the adapter by this seed (pie.engine.zo); never a stream step

    def __post_init__(self) -> None:
        if self.owner is None and self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        self._index_outputs()

    def _index_outputs(self) -> None:
        outputs = self.outputs
        self.results = [None] * len(outputs)
        self._order = list(range(len(outputs)))
        if len(outputs) > 1:
            self._order.sort(key=lambda i: outputs[i].index)

    def reset(self, start: int, end: int, outputs: list[OutputSpec] | None = None) -> None:
        """Reuse an owner's job for its next pass (same masks and seed) at slots [start, end)."""
        self.start, self.end = start, end
        if outputs is not None:
            self.outputs = outputs
            self._index_outputs()
        else:
            self.results = [None] * len(self.outputs)
        self._next = 0
        self.missed_at = -1
        self.computing = None
        self.cancelled = False

    @property
    def settled(self) -> bool:
        """Resolved, failed or given up: the scheduler forgets it."""
        future = self.future
        return self.cancelled if future is None else future.done()

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
    chained_steps: int = 0  # stream steps built while their previous step was in flight (pipelining)
