"""Making room in a full page pool: which contexts lose their pages, and how.

The scheduler calls `Suspender.make_room` when a chunk's pages do not fit.
Victims are suspended, never killed, one at a time until the chunk fits:

- to the engine's host swap pool when it has one with free slots (the
  swap-out rides in the batch being built; the context is swapped back in
  with the chunk of its next pass and continues without recomputation);
- otherwise their pages are dropped and their record kept, and the KV is
  recomputed on their next pass. Contexts holding masked or adapter KV cannot
  be recomputed, so they are only ever swapped.
"""

from __future__ import annotations

from pie.runtime.context import Context
from pie.runtime.context_space import ContextSpace
from pie.runtime.jobs import PageOps, SchedulerStats


class Suspender:
    def __init__(self, space: ContextSpace, stats: SchedulerStats) -> None:
        self.space = space
        self.stats = stats

    def make_room(self, ctx: Context, start: int, end: int, ops: PageOps, *, lead: bool,
                  cutoff: int) -> int | None:
        """Suspend victims until `ctx`'s slots [start, end) fit; the pages needed, or None if they cannot.

        `lead`: `ctx` has the lead pass (see `victims`); `cutoff`: the context-clock tick before which
        a context counts as idle."""
        pool = self.space.pool
        victims: list[Context] | None = None
        while True:
            need = ctx.pages_needed(start, end)
            if pool.can_allocate(need):
                return need
            if victims is None:
                victims = self.victims(ctx, lead=lead, cutoff=cutoff)
            if not victims:
                return None
            self.suspend(victims.pop(), ops)

    def suspend(self, ctx: Context, ops: PageOps) -> None:
        """Free `ctx`'s pages: to host slots (swap-out in this batch) when they fit, else dropped.

        A context swapped out already only holds pages before its swapped
        ones (prefix-trie or recomputed KV): those are dropped, the slots kept.
        Dropped KV that the trie does not hold is recomputed on the next pass."""
        host = self.space.host
        _, num_kept = ctx.swap_span()
        if host is not None and num_kept and not ctx.swapped and host.can_allocate(num_kept):
            ops.swap_out += ctx.swap_out(host.allocate(num_kept))
            self.stats.swapped_out_pages += num_kept
        elif ctx.recomputable:
            ctx.suspend()
            self.stats.recomputed_suspensions += int(num_kept > 0)
        else:  # host slots ran out since `victims` offered it
            return
        self.stats.suspensions += 1

    def victims(self, ctx: Context, *, lead: bool, cutoff: int) -> list[Context]:
        """Contexts that may lose their pages for `ctx`, the best victim last.

        Any lower-priority context qualifies. Of equal priority: contexts idle
        since before `cutoff` (the previous batch; least recently used first),
        then contexts with a pending pass that are younger than `ctx` (youngest
        first), so a younger context never pushes an older one back out (no
        ping-pong; vLLM's preempt-the-newest). The lead pass (oldest context of
        the top priority) may also take the pages of any idle context, so some
        pass can always run: only contexts in this batch, and those that can
        neither be recomputed (masked KV) nor swapped to host, keep their pages."""
        prio = ctx.priority
        found = [c for c in self.space.live.values()
                 if c is not ctx and c.pages and not c.in_batch and (c.recomputable or self._fits_host(c))
                 and (c.priority < prio or (lead and not c.pending) or (c.priority == prio and (
                     c.id > ctx.id if c.pending else c.last_used < cutoff)))
                 and c.freeable_pages()]
        found.sort(key=lambda c: (c.priority, c.pending, -c.id if c.pending else c.last_used), reverse=True)
        return found

    def _fits_host(self, ctx: Context) -> bool:
        """`ctx` can be swapped out whole now (it cannot be recomputed, so swapping is its only way out)."""
        if self.space.host is None or ctx.swapped:
            return False
        num_pages = ctx.swap_span()[1]
        return num_pages > 0 and self.space.host.can_allocate(num_pages)
