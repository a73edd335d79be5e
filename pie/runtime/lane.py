"""The stream lane: the decode steps of every run-ahead stream, built and landed as array operations.

A run-ahead stream (`pie.runtime.runahead.TokenStream`) enters its scheduler's lane once a pass of its
own has landed (its first pass, or a step that took the long way). From then on each batch the scheduler
builds takes one row per ready member, gathered from the members' arrays into the batch's `StepRows`
(token, position, page table, sampler), and each landing appends the sampled tokens, checks stop tokens
and limits and finds whom to wake, again as array operations. Python runs per member only for what is
rare: a step that opens a page (one in `page_size`), a token budget, a delivery, a stop, leaving.

Chaining: while batch N is in flight the scheduler builds N+1 (`build(chain=N)`); a member whose newest
row is in N gets the next row at the slot after it, its input read from N's output by the engine client
(`StepRows.token_from`). When N lands and the token ends the stream (a stop token, the limit), that next
row is wasted: its slot is given back, and its landing matches no member (`gen`).

The context's token record is written lazily: a member's sampled tokens live in its ring until a sync
(a delivery to the inferlet, or leaving the lane) moves them to the stream's list and appends the inputs
known by then to the context (`_sync`). In between the context belongs to the lane (`in_batch` is
`IN_LANE`, so nothing suspends it, and the host refuses every other call while the stream runs), so no
one else reads the record.

A member leaves (`_leave`, after a sync) when it ends, when it is `depth` tokens ahead of the inferlet
(it pauses; the next delivery resumes it the long way), when a step needs what the lane does not do
(a shared page to copy, a full pool, the instance's page limit, the token budget: `exiting`, it takes
the long way as an ordinary pass through the scheduler and comes back after it), and when the
inferlet stops or the context goes. A left member's rows still in flight are ignored when they land.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from inferlet._host import HostError
from pie.engine.batch import Sampler, StepRows
from pie.runtime.context import Context
from pie.runtime.context_space import ContextSpace
from pie.runtime.jobs import SchedulerStats

if TYPE_CHECKING:
    from pie.runtime.runahead import TokenStream

IN_LANE = -1  # `Context.in_batch` of a lane member's context: always in a batch, as far as others care

class StreamLane:
    def __init__(self, space: ContextSpace, stats: SchedulerStats) -> None:
        self.space = space
        self.stats = stats
        self.page_size = space.page_size
        self.size = 0  # live members
        self._streams: list[TokenStream | None] = []  # member index -> its stream
        self._free: list[int] = []
        self._samplers: list[Sampler] = []
        self._sampler_ids: dict[Sampler, int] = {}
        # Per member (index m), set in `enter`; arrays grow by doubling (`_grow_members`).
        self.live = np.zeros(0, bool)
        self.gen = np.zeros(0, np.int64)  # bumped when the member leaves: its rows in flight no longer match
        self.slot = np.zeros(0, np.int64)  # slot of its next row
        self.shift = np.zeros(0, np.int64)  # slot - position of its rows (what M-RoPE images saved: usually 0)
        self.first = np.zeros(0, np.int64)  # slot of the input of the stream's first sampled token
        self.count = np.zeros(0, np.int64)  # tokens sampled (the stream's, from its first pass on)
        self.delivered = np.zeros(0, np.int64)  # of which handed to the inferlet
        self.synced = np.zeros(0, np.int64)  # of which moved to the stream's list
        self.computed = np.zeros(0, np.int64)  # the context's KV is valid up to this slot
        self.max_tokens = np.zeros(0, np.int64)
        self.depth = np.zeros(0, np.int64)
        self.batch = np.zeros(0, np.int64)  # tokens per delivery
        self.flight = np.zeros(0, np.int64)  # the newest batch holding a row of it (0: none in flight)
        self.row = np.zeros(0, np.int64)  # that row's index in the batch's steps
        self.sampler = np.zeros(0, np.int64)  # into `_samplers`
        self.exiting = np.zeros(0, bool)  # takes the long way once its rows in flight landed
        self.waiting = np.zeros(0, bool)  # the inferlet waits for a delivery
        self.budgeted = np.zeros(0, bool)  # each step is charged to the instance's token budget
        self.extras = np.zeros(0, bool)  # has a seed, logit mask or adapter
        self.stops = np.full((0, 0), -1, np.int64)  # [m, K] stop tokens, -1 padded
        self.pages = np.zeros((0, 0), np.int32)  # [m, P] the context's pages, mirrored
        self.ring = np.zeros((0, 1), np.int64)  # [m, D] token number j (from 1) at j % D; D a power of two

    # -- membership -----------------------------------------------------------------------------

    def enter(self, stream: TokenStream) -> None:
        """A stream whose own pass just landed: its last sampled token is the next input, at the end of
        the context's record, which the landed pass left computed."""
        tokens = stream.tokens
        self._admit(stream, len(stream.ctx.tokens), len(tokens), tokens[-1])

    def enter_first(self, stream: TokenStream, start: int, token: int) -> bool:
        """A new stream whose first pass is one buffered token at slot `start` (recorded already, all KV
        before it computed): that pass becomes the stream's first row, so it never goes through the
        scheduler's queue. False (nothing done) if the row needs what only the scheduler does: a shared
        page to copy, pages to restore or recompute, a context in a batch."""
        ctx = stream.ctx
        if ctx.computed_len != start or ctx.swapped or ctx.in_batch:
            return False
        k, pages = start // self.page_size, ctx.pages
        if start % self.page_size:  # the row writes into page k: it must be there, and private
            if k >= len(pages) or self.space.pool.refcount(pages[k]) > 1 or self.space.trie.holds(pages[k]):
                return False
        elif len(pages) < k:  # pages before the one the row opens are missing (dropped by a suspension)
            return False
        self._admit(stream, start, 0, token)
        return True

    def _admit(self, stream: TokenStream, slot: int, count: int, token: int) -> None:
        """Make the stream a member whose next row is at `slot`, its input `token`, after `count` sampled
        tokens (all KV before `slot` computed)."""
        ctx = stream.ctx
        m = self._free.pop() if self._free else self._grow_members()
        self._streams[m] = stream
        stream.member = m
        self.live[m] = True
        self.slot[m] = self.computed[m] = slot
        self.shift[m] = len(ctx.tokens) - ctx.next_position
        self.first[m] = stream.first_slot
        self.count[m] = self.synced[m] = count
        self.delivered[m] = stream.delivered
        self.max_tokens[m] = stream.max_tokens
        self.depth[m] = stream.depth
        self.batch[m] = stream.batch
        self.flight[m] = 0
        self.exiting[m] = False
        self.waiting[m] = stream.waiting
        self.budgeted[m] = stream.budgeted
        self.extras[m] = stream.extras is not None
        sampler = stream.sampler
        sid = self._sampler_ids.get(sampler)
        if sid is None:
            sid = self._sampler_ids[sampler] = len(self._samplers)
            self._samplers.append(sampler)
        self.sampler[m] = sid
        stop = stream.stop_tokens
        if len(stop) > self.stops.shape[1]:
            self.stops = _widen(self.stops, len(stop), -1)
        self.stops[m] = -1
        if stop:
            self.stops[m, :len(stop)] = list(stop)
        pages = ctx.pages
        if len(pages) + 1 > self.pages.shape[1]:
            self.pages = _widen(self.pages, 2 * len(pages) + 8, 0)
        self.pages[m, :len(pages)] = pages
        if stream.depth + 2 > self.ring.shape[1]:
            self._widen_ring(stream.depth + 2)
        self.ring[m, count & (self.ring.shape[1] - 1)] = token
        ctx.pending = True
        ctx.in_batch = IN_LANE
        self.size += 1

    def leave(self, stream: TokenStream, *, sync: bool = True) -> None:
        """Take the stream out of the lane (the inferlet stops it, or its context goes: `sync=False`)."""
        if stream.member >= 0:
            self._leave(stream.member, sync=sync)

    def deliver(self, stream: TokenStream) -> list[int]:
        """Hand the inferlet every token it has not seen: the stream's list and the context's record are
        brought up to date first."""
        m = stream.member
        if m >= 0:
            self._sync(m)
        out = stream.tokens[stream.delivered:]
        stream.delivered = len(stream.tokens)
        if m >= 0:
            self.delivered[m] = stream.delivered
        return out

    def set_waiting(self, stream: TokenStream, waiting: bool) -> None:
        if stream.member >= 0:
            self.waiting[stream.member] = waiting

    def fail_all(self, error: BaseException) -> None:
        for stream in [s for s in self._streams if s is not None]:
            self._leave(stream.member, sync=True)
            stream.end_with(error)

    # -- building a batch -----------------------------------------------------------------------

    def build(self, chain: int, limit: int, building: int) -> tuple[StepRows, np.ndarray, np.ndarray] | None:
        """Up to `limit` rows for batch `building`: one per member ready to step (its newest row landed,
        or in batch `chain`, which is in flight: then the row reads its token), as (steps, members, gens)."""
        if not self.size or limit <= 0:
            return None
        flight = self.flight
        in_chain = flight == chain if chain else np.zeros(len(flight), bool)
        after = self.count + in_chain  # tokens the member has once its newest row landed
        ready = self.live & ~self.exiting & ((flight == 0) | in_chain) & (after < self.max_tokens) & (
            after - self.delivered < self.depth)
        rows = np.flatnonzero(ready)[:limit]
        if not len(rows):
            return None
        slots = self.slot[rows]
        offsets = slots % self.page_size
        opening = offsets == 0
        if opening.any() or self.budgeted[rows].any():
            keep = self._place(rows, slots, opening)
            if not keep.all():
                rows, slots, offsets = rows[keep], slots[keep], offsets[keep]
                if not len(rows):
                    return None
        n = len(rows)
        num_pages = slots // self.page_size + 1
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(num_pages, out=indptr[1:])
        width = int(num_pages.max())
        table = self.pages[rows, :width]
        page_ids = table[np.arange(width) < num_pages[:, None]] if width > 1 else table[:, 0]
        chained = in_chain[rows]
        token_from = np.where(chained, self.row[rows], -1) if chained.any() else None
        ring = self.ring
        tokens = ring[rows, self.count[rows] & (ring.shape[1] - 1)]  # chained rows: replaced by token_from
        steps = StepRows(tokens, slots - self.shift[rows], indptr, page_ids, offsets + 1, self._samplers, self.sampler[rows],
                         token_from=token_from)
        if self.extras[rows].any():
            streams = self._streams
            extras = [streams[m].extras or (None, None, None) for m in rows.tolist()]
            steps.seeds = [e[0] for e in extras]
            steps.logit_masks = [e[1] for e in extras]
            steps.adapters = [e[2] for e in extras]
        self.slot[rows] = slots + 1
        self.flight[rows] = building
        self.row[rows] = np.arange(n)
        self.stats.chained_steps += int(chained.sum())
        return steps, rows, self.gen[rows]

    def _place(self, rows: np.ndarray, slots: np.ndarray, opening: np.ndarray) -> np.ndarray:
        """Pages for the rows that open one and the token budget of budgeted rows, in Python (one row in
        `page_size`); a row that cannot get them is dropped and its member takes the long way. When the
        pool has a page for every opening row, the fresh pages are taken in one call at the end, in the
        order the row-by-row calls would have taken them."""
        keep = np.ones(len(rows), bool)
        space, streams = self.space, self._streams
        pool, trie, ps = space.pool, space.trie, self.page_size
        budgeted = self.budgeted[rows]
        batched = pool.can_allocate(int(opening.sum()))  # an upper bound: reserved pages take none
        takers: list[int] = []  # rows taking a fresh page (batched), and their contexts
        contexts: list[Context] = []
        for i in np.flatnonzero(opening | budgeted).tolist():
            m = int(rows[i])
            stream = streams[m]
            assert stream is not None
            ctx = stream.ctx
            slot = int(slots[i])
            try:
                if opening[i]:
                    k = slot // ps
                    if slot >= ctx.num_pages * ps:
                        # the instance's page limit (raises HostError); the record is behind (synced lazily)
                        stream.grow(ctx, slot + 1 - len(ctx.tokens))
                    pages = ctx.pages
                    if k < len(pages):  # reserved already: usable only if private
                        if pool.refcount(pages[k]) > 1 or trie.holds(pages[k]):
                            raise _LongWay
                    elif k == len(pages) and batched:
                        takers.append(i)
                        contexts.append(ctx)
                    elif k == len(pages) and pool.can_allocate(1):
                        self._give_pages([ctx], [m], [k], pool.allocate(1))
                    else:
                        raise _LongWay  # the pool is short: the scheduler's long way suspends or waits
                if budgeted[i]:
                    stream.charge(1)
                    stream.charged += 1
            except (_LongWay, HostError):  # HostError: the long way's step reports it
                self.exiting[m] = True
                keep[i] = False
                if self.flight[m] == 0:  # nothing of it in flight: it goes now
                    self._exit(m)
        if takers:
            taken = np.array(takers)
            fresh = pool.allocate(len(takers))
            fresh.reverse()  # allocate(1) after allocate(1) takes the free list from its end
            self._give_pages(contexts, rows[taken].tolist(), (slots[taken] // ps).tolist(), fresh)
        return keep

    def _give_pages(self, contexts: list[Context], members: list[int], ks: list[int], pages: list[int]) -> None:
        """Page ks[i] of contexts[i] (member members[i], which has ks[i] pages) is pages[i], a fresh one; the
        mirror too (a member that left meanwhile has a stale row, rewritten when it enters again)."""
        for ctx, page in zip(contexts, pages, strict=True):
            ctx.pages.append(page)
        width = max(ks) + 1
        if width > self.pages.shape[1]:
            self.pages = _widen(self.pages, 2 * width + 6, 0)
        self.pages[members, ks] = pages

    # -- landing --------------------------------------------------------------------------------

    def land(self, flight: int, members: np.ndarray, gens: np.ndarray, positions: np.ndarray,
             tokens: np.ndarray) -> None:
        """Batch `flight` is back: `tokens[i]` was sampled by the row of member `members[i]` at `positions[i]`."""
        ok = self.gen[members] == gens  # rows of members that left (or whose index was reused) are void
        if not ok.all():
            members, positions, tokens = members[ok], positions[ok], tokens[ok]
            if not len(members):
                return
        slots = positions + self.shift[members]
        count = self.count[members] + 1
        self.count[members] = count
        ring = self.ring
        ring[members, count & (ring.shape[1] - 1)] = tokens
        self.computed[members] = slots + 1
        latest = self.flight[members] == flight  # no row of it in the batch behind
        self.flight[members[latest]] = 0
        ended = count >= self.max_tokens[members]
        if self.stops.shape[1]:
            ended |= (self.stops[members] == tokens[:, None]).any(1)
        ahead = count - self.delivered[members]
        attend = ended | (latest & ((ahead >= self.depth[members]) | self.exiting[members])) | (
            self.waiting[members] & (ahead >= self.batch[members]))
        for i in np.flatnonzero(attend).tolist():
            self._attend(int(members[i]), bool(ended[i]), bool(latest[i]))

    def land_failed(self, members: np.ndarray, gens: np.ndarray, positions: np.ndarray,
                    errors: list[BaseException | None]) -> None:
        """Rows that failed (errors[i] not None): their members end with the error, their contexts cut
        back to before the failed row."""
        for m, g, p, error in zip(members.tolist(), gens.tolist(), positions.tolist(), errors, strict=True):
            if error is None or self.gen[m] != g:
                continue
            stream = self._streams[m]
            assert stream is not None
            slot = p + int(self.shift[m])
            self.slot[m] = min(int(self.slot[m]), slot)
            self._leave(m, sync=True)
            if not stream.ctx.closed and stream.ctx.kv_len > slot:
                stream.ctx.rollback(slot)
            stream.end_with(error)

    def inputs(self, steps: StepRows, members: np.ndarray, gens: np.ndarray) -> list[bool]:
        """Fill a chained block's input tokens from the members' rings once its source batch has landed
        (retries); False for rows whose member is gone."""
        alive = (self.gen[members] == gens).tolist()
        if steps.token_from is not None:
            chained = steps.token_from >= 0
            ring = self.ring
            steps.tokens[chained] = ring[members[chained], self.count[members[chained]] & (ring.shape[1] - 1)]
            steps.token_from = None
        return alive

    def _attend(self, m: int, ended: bool, latest: bool) -> None:
        stream = self._streams[m]
        assert stream is not None
        if ended:
            if not latest:  # its next row, in the batch behind, read a token that ends the stream: wasted
                self.slot[m] -= 1
            self._leave(m, sync=True)
            stream.end()
        elif latest and self.exiting[m]:
            self._exit(m)
        elif latest and self.count[m] - self.delivered[m] >= self.depth[m]:
            self._leave(m, sync=True)  # paused at its depth: the next delivery resumes it the long way
            stream.wake()
        else:
            stream.wake()

    def _exit(self, m: int) -> None:
        """Leave and take the next step the long way (an ordinary pass)."""
        stream = self._streams[m]
        assert stream is not None
        self._leave(m, sync=True)
        stream.long_way()

    # -- the record -----------------------------------------------------------------------------

    def _sync(self, m: int) -> None:
        """Move the member's new tokens to its stream's list and the inputs known so far to the context."""
        stream = self._streams[m]
        assert stream is not None
        count, synced = self.count.item(m), self.synced.item(m)
        if count > synced:  # tokens synced+1 .. count: one or two runs of the ring
            row = self.ring[m]
            size = len(row)
            a, b = (synced + 1) % size, count % size + 1
            stream.tokens += row[a:b].tolist() if a < b else row[a:].tolist() + row[:b].tolist()
            self.synced[m] = count
        ctx = stream.ctx
        if ctx.closed:
            return
        first = self.first.item(m)
        end = min(self.slot.item(m), first + count)  # the slots whose input token is known
        start = len(ctx.tokens)
        if end > start:
            new = stream.tokens[start - first:end - first]
            shift = self.shift.item(m)
            if stream.adapter is None:  # sequential positions, base-model KV: nothing for `append` to mark
                ctx.tokens += new
                ctx.positions += range(start - shift, end - shift)
            else:
                ctx.append(new, range(start - shift, end - shift), custom_kv=True)
        ctx.computed_len = self.computed.item(m)
        ctx.last_used = self.space.tick()

    def _leave(self, m: int, *, sync: bool) -> None:
        stream = self._streams[m]
        assert stream is not None
        if sync:
            self._sync(m)
        ctx = stream.ctx
        if ctx.in_batch == IN_LANE:
            ctx.in_batch = 0
        ctx.pending = False
        self.live[m] = False
        self.gen[m] += 1
        self._streams[m] = None
        self._free.append(m)
        stream.member = -1
        self.size -= 1
        if not self.size:  # forget the samplers of streams long gone
            self._samplers, self._sampler_ids = [], {}

    # -- storage --------------------------------------------------------------------------------

    def _grow_members(self) -> int:
        """Room for more members (doubling); returns a free index."""
        old = len(self._streams)
        new = max(16, 2 * old)
        for name, a in list(vars(self).items()):  # every per-member 1-D array declared in __init__
            if isinstance(a, np.ndarray) and a.ndim == 1:
                b = np.zeros(new, a.dtype)
                b[:old] = a
                setattr(self, name, b)
        self.stops = _rows(self.stops, new, -1)
        self.pages = _rows(self.pages, new, 0)
        self.ring = _rows(self.ring, new, 0)
        self._streams += [None] * (new - old)
        self._free += range(new - 1, old, -1)
        return old

    def _widen_ring(self, n: int) -> None:
        """A ring of at least n tokens per member: re-place every live member's unsynced tokens."""
        old, size = self.ring, 1 << (n - 1).bit_length()
        ring = np.zeros((old.shape[0], size), np.int64)
        for m in np.flatnonzero(self.live).tolist():
            j = np.arange(int(self.synced[m]), int(self.count[m]) + 1)
            ring[m, j & (size - 1)] = old[m, j & (old.shape[1] - 1)]
        self.ring = ring


class _LongWay(Exception):
    """A step the lane cannot place (a shared page to copy, a short pool)."""


def _widen(a: np.ndarray, columns: int, fill: int) -> np.ndarray:
    b = np.full((a.shape[0], columns), fill, a.dtype)
    b[:, :a.shape[1]] = a
    return b


def _rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    b = np.full((rows, a.shape[1]), fill, a.dtype)
    b[:a.shape[0]] = a
    return b
