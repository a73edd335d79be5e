"""A context: one KV sequence, as a logical record plus a chain of physical pages.

Logical state (what the inferlet sees, `Host.ctx_state`): `kv_len` slots, each
with its token and position (the record below), of which the first
`num_committed` pages are committed (full, immutable, content-keyed), within a
capacity of `num_pages` pages (committed + reserved working pages).

Physical state (what the engine holds): `pages`, the page ids covering slots
`[0, len(pages) * page_size)`, and `computed_len`, how many leading slots have
valid KV in them. `computed_len < kv_len` while a pass is pending and after a
suspension; the scheduler computes the missing slots (re-prefill) from the
record before anything else, so suspension never loses a context.

Suspension (`pie.runtime.suspension.Suspender.suspend`) either drops every page (`suspend`: the KV
is recomputed from the record later) or, when the engine has a host swap pool,
moves them to host slots (`swap_out`). A swapped-out context keeps `swapped`:
the host slots of pages `[swap_first, swap_first + len(swapped))`, valid up to
slot `swapped_len`. Only the pages after the leading run of *shared* trie
pages (in the prefix trie and held by another context too) are copied: those
stay resident while their other holders live and are found again by content
key (`attach_cached`), or, if the pool evicted them meanwhile, recomputed;
copying them would free no device page and spend host slots. Trie pages only
this context holds are copied like the rest: dropped, they would be the first
cached pages the allocation that suspended them evicts. Once `computed_len`
reaches `swap_first * page_size` the scheduler swaps the rest back in
(`restore`), in the batch that computes the context's next rows.

Sharing: fork takes a reference on every page (O(pages) ints, no KV copy).
A page shared with another context or registered in the prefix trie is never
written in place: the write that touches it first gets a fresh page, plus a
page copy in the same batch when the page holds slots before the write
(copy-on-write). Pages written under a custom attention mask, an adapter or
positions other than the expected ones (the slot indices, less the positions
M-RoPE images took fewer than their tokens: `next_position`) are *dirty*: their
KV is not a function of (tokens, positions) alone, so they get no content key
and are never shared, and a context holding masked/adapter KV cannot be recomputed (it is
only suspended by swapping to host).

Hybrid models (a `ContextSpace` with `states`): a context also holds a
recurrent-state slot (`state_slot`, `pie.runtime.state_slots`) whose state is
that after its first `computed_len` tokens. A state cannot be cut back, so
whatever cuts the record below `computed_len` (truncate, release, the rollback
of a pass, a run-ahead stop) sends the context back to `computed_len = 0`: its
KV and state are recomputed from the record with its next pass (its pages stay
and are rewritten). Fork copies the slot (queued for the next batch). A prefill
chunk that ends at a page boundary leaves a prefix checkpoint of its state
(`StateSlots.checkpoint`); prefix pages are attached from the trie only up to
the deepest page with a checkpoint, whose state is then copied into the slot.
A swap-out copies every computed page while the state stays in the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from inferlet._host import HostError
from pie.errors import OutOfPagesError
from pie.runtime.images import (
    ImagePlacement,
    chunk_end,
    expected_positions,
    overlapping,
    page_extra,
    position_shift,
)
from pie.runtime.prefix_trie import ROOT_KEY, PageKey, page_key

if TYPE_CHECKING:
    from pie.runtime.context_space import ContextSpace


class Attached(NamedTuple):
    skipped: int  # slots attached from the prefix trie instead of computed
    missed: PageKey | None  # key of the first full page not in the trie (None: none was keyable)


class Context:
    def __init__(self, space: ContextSpace, owner: str, id: int) -> None:
        """Made by `ContextSpace.create`, which numbers the contexts of its pool."""
        self.space = space
        self.id = id
        self.owner = owner  # an instance id, or "snapshot"
        self.tokens: list[int] = []  # [kv_len] the record: token of each slot
        self.positions: list[int] = []  # [kv_len] and its position id
        self.num_committed = 0
        self.keys: list[PageKey | None] = []  # [num_committed] content keys; None = dirty, never shared
        self.num_pages = 0  # capacity: committed + working pages
        self.dirty: set[int] = set()  # working page indices that must not be shared
        self.recomputable = True  # False once masked/adapter KV was written
        self.pages: list[int] = []  # physical pages, covering slots [0, len(pages) * page_size)
        self.computed_len = 0  # leading slots with valid KV in `pages`
        self.swapped: list[int] = []  # host slots of pages [swap_first, ...) while swapped out
        self.swap_first = 0  # page index of swapped[0]
        self.swapped_len = 0  # the swapped pages hold valid KV for slots [swap_first * page_size, swapped_len)
        self.priority = 0.0
        self.last_used = space.tick()
        self.pending = False  # a pass was submitted and has not resolved
        self.in_batch = 0  # id of the last batch being built or in flight that holds it (0: none): pages pinned
        self.closed = False
        self.images: list[ImagePlacement] = []  # by slot: the images in the record (pie.runtime.images)
        self.state_slot: int | None = None  # hybrid models: the recurrent state after `computed_len` tokens

    # -- the logical view -----------------------------------------------------------------------

    @property
    def kv_len(self) -> int:
        return len(self.tokens)

    @property
    def next_position(self) -> int:
        """The position of the next token: kv_len, less the positions M-RoPE images took fewer than slots."""
        return len(self.tokens) - position_shift(self.images) if self.images else len(self.tokens)

    @property
    def working_tokens(self) -> int:
        return len(self.tokens) - self.num_committed * self.space.page_size

    @property
    def resident(self) -> bool:
        return self.computed_len == len(self.tokens)

    def state(self) -> tuple[int, int, int]:
        """(committed pages, working pages, tokens in working pages): `Host.ctx_state`."""
        return self.num_committed, self.num_pages - self.num_committed, self.working_tokens

    def _check_idle(self, what: str) -> None:
        if self.closed:
            raise HostError(f"cannot {what}: the context was destroyed")
        if self.pending:
            raise HostError(f"cannot {what} while a forward pass on this context is pending; await it first")

    # -- page-level operations of the inferlet API ----------------------------------------------

    def reserve(self, n: int, *, for_stream: bool = False) -> None:
        """`for_stream`: the context's run-ahead stream grows it while the stream's own step is in flight
        (its only pass): capacity is a count, pages are placed when a step is admitted, so no idle check."""
        if not for_stream:
            self._check_idle("reserve pages")
        elif self.closed:
            raise HostError("cannot reserve pages: the context was destroyed")
        total = self.space.pool.num_pages
        if self.num_pages + n > total:
            raise OutOfPagesError(f"reserving {n} more pages would give this context {self.num_pages + n} pages, "
                                  f"more than the {total} the KV pool has; use a shorter sequence")
        self.num_pages += n

    def release(self, n: int) -> None:
        """Drop the last `n` working pages (and any tokens written in them)."""
        self._check_idle("release pages")
        working = self.num_pages - self.num_committed
        if n > working:
            raise HostError(f"cannot release {n} working pages: the context has {working}")
        self.num_pages -= n
        capacity = self.num_pages * self.space.page_size
        if self.kv_len > capacity:
            self._cut(capacity)
        if len(self.pages) > self.num_pages:
            extra = self.pages[self.num_pages:]
            del self.pages[self.num_pages:]
            self.space.pool.decref(reversed(extra))

    def truncate(self, n: int) -> None:
        """Forget the last `n` tokens of the working pages (their pages stay reserved)."""
        self._check_idle("truncate")
        if n > self.working_tokens:
            raise HostError(f"cannot truncate {n} tokens: the working pages hold {self.working_tokens} "
                            "(committed pages are immutable)")
        self._cut(self.kv_len - n)

    def commit(self, n: int) -> None:
        """Make the first `n` working pages committed: keyed by content and shared through the trie."""
        self._check_idle("commit pages")
        ps = self.space.page_size
        full = self.working_tokens // ps
        if n > full:
            raise HostError(f"cannot commit {n} pages: only {full} working pages are full "
                            f"({self.working_tokens} tokens, page size {ps})")
        for j in range(self.num_committed, self.num_committed + n):
            parent = self.keys[j - 1] if j else ROOT_KEY
            key = None if parent is None or j in self.dirty else self._content_key(parent, j)
            self.keys.append(key)
            self.dirty.discard(j)
        self.num_committed += n
        self._register(self.num_committed - n, self.num_committed)

    def fork(self, owner: str) -> Context:
        """A new context with the same content, sharing every page (copy-on-write)."""
        self._check_idle("fork")
        child = self.space.create(owner)
        child.tokens, child.positions = self.tokens.copy(), self.positions.copy()
        child.num_committed, child.keys = self.num_committed, self.keys.copy()
        child.num_pages, child.dirty, child.recomputable = self.num_pages, set(self.dirty), self.recomputable
        child.pages, child.computed_len = self.pages.copy(), self.computed_len
        child.priority = self.priority
        child.images = self.images.copy()
        self.space.pool.incref(child.pages)
        if child.state_slot is not None and self.state_slot is not None and self.computed_len:
            assert self.space.states is not None
            self.space.states.copy(self.state_slot, child.state_slot)
        return child

    def destroy(self) -> None:
        if self.closed:
            return
        self._drop_pages()
        self._release_swap(0)
        if self.state_slot is not None:
            assert self.space.states is not None
            self.space.states.free(self.state_slot)
        self.closed = True
        del self.space.live[self.id]

    # -- the record: what a pass appends, and undoing it ----------------------------------------

    def append(self, tokens: Sequence[int], positions: Sequence[int], *, custom_kv: bool,
               images: Sequence[ImagePlacement] = ()) -> None:
        """Record a pass's inputs at slots [kv_len, kv_len + n). custom_kv: a mask or an adapter applies.
        images: those the pass places, at their context slots."""
        start, ps = self.kv_len, self.space.page_size
        first = self.next_position
        self.images.extend(images)
        self.tokens.extend(tokens)
        self.positions.extend(positions)
        if images:
            sequential = list(positions) == expected_positions(first, len(positions), images, start)
        else:
            sequential = positions[0] == first and positions[-1] == first + len(positions) - 1 and (
                len(positions) < 3 or list(positions) == list(range(first, first + len(positions))))
        if custom_kv or not sequential:
            self.dirty.update(range(start // ps, (self.kv_len - 1) // ps + 1))
        if custom_kv:
            self.recomputable = False

    def rollback(self, kv_len: int) -> None:
        """Undo a pass that did not complete (cancelled or failed)."""
        assert kv_len >= self.num_committed * self.space.page_size, "a pending pass never precedes a commit"
        self._cut(kv_len)

    def _cut(self, kv_len: int) -> None:
        del self.tokens[kv_len:]
        del self.positions[kv_len:]
        if self.images and self.images[-1].slot >= kv_len:
            self.images = [p for p in self.images if p.slot < kv_len]
        hybrid = self.state_slot is not None
        if hybrid and kv_len < self.computed_len:
            self.computed_len = 0  # the state holds tokens past the cut: recompute it from the record
        self.computed_len = min(self.computed_len, kv_len)
        ps = self.space.page_size
        self.dirty = {j for j in self.dirty if j * ps < kv_len}
        if hybrid and self.swapped and kv_len < self.swapped_len:
            self._release_swap(0)  # swapped out past the cut: the slot's state is too, recompute instead
        if self.swapped:
            self.swapped_len = min(self.swapped_len, kv_len)
            self._release_swap(max(0, -(-self.swapped_len // ps) - self.swap_first))

    # -- physical pages: what the scheduler calls while building a batch ------------------------

    def attach_cached(self, limit: int) -> Attached:
        """Skip computing leading full pages of the pending slots whose content is in the trie.

        Only pages entirely below slot `limit` (the first row something must be
        read from) are attached. Returns the slots skipped and the key of the
        first full page that missed (None when no full, shareable page was left)."""
        ps, pool, trie = self.space.page_size, self.space.pool, self.space.trie
        start = self.computed_len
        if start % ps:
            return Attached(0, None)
        j = start // ps
        parent = self._key_before(j)
        end = min(limit, self.restore_limit())  # swapped pages come back by swap-in, not from the trie
        missed = None
        if self.state_slot is not None:  # a hybrid resumes only where a state checkpoint is: stop there
            end = min(end, self._checkpointed_end(j, parent, end))
        while parent is not None and (j + 1) * ps <= end:
            key = self.keys[j] if j < self.num_committed else (
                None if j in self.dirty else self._content_key(parent, j))
            page = trie.lookup(key) if key is not None else None
            if page is None:
                missed = key
                break
            if j < len(self.pages):
                if self.pages[j] != page:
                    pool.incref((page,))
                    pool.decref((self.pages[j],))
                    self.pages[j] = page
            else:
                pool.incref((page,))
                self.pages.append(page)
            parent, j = key, j + 1
        self.computed_len = j * ps
        if self.state_slot is not None:
            if j * ps > start:  # the state after the attached pages, copied in before this context's next forward
                states = self.space.states
                assert states is not None and parent is not None
                ckpt = states.lookup(parent)
                assert ckpt is not None, "attached up to a page without a state checkpoint"
                states.copy(ckpt, self.state_slot)
            missed = None  # no waiting for a pass computing the next page: its state would not be kept
        return Attached(self.computed_len - start, missed)

    def _checkpointed_end(self, j: int, parent: PageKey | None, end: int) -> int:
        """The end of the deepest page from `j` on, within `end`, that the trie holds (with every page before it)
        and that has a state checkpoint; `j * page_size` when none has."""
        ps, trie, states = self.space.page_size, self.space.trie, self.space.states
        assert states is not None
        best = j * ps
        while parent is not None and (j + 1) * ps <= end:
            key = self.keys[j] if j < self.num_committed else (
                None if j in self.dirty else self._content_key(parent, j))
            if key is None or trie.lookup(key) is None:
                break
            parent, j = key, j + 1
            if states.has_checkpoint(key):
                best = j * ps
        return best

    def pages_needed(self, start: int, end: int) -> int:
        """Fresh pages a write of slots [start, end) takes: new tail pages plus copy-on-write copies."""
        ps, pages = self.space.page_size, self.pages
        first, last = start // ps, (end - 1) // ps
        n = max(0, last + 1 - len(pages))
        for j in range(first, min(last + 1, len(pages))):
            n += self._shared(pages[j])
        return n

    def prepare_write(self, start: int, end: int, fresh: list[int]) -> list[tuple[int, int]]:
        """Give slots [start, end) private pages from `fresh` (exactly `pages_needed` of them).

        Returns the (src, dst) page copies the batch must do first."""
        assert start == self.computed_len, f"writes start at computed_len {self.computed_len}, not {start}"
        ps, pages, pool = self.space.page_size, self.pages, self.space.pool
        first, last = start // ps, (end - 1) // ps
        copies = []
        for j in range(first, min(last + 1, len(pages))):
            if self._shared(pages[j]):
                page = fresh.pop()
                if j == first and start % ps:  # slots before `start` in this page must be kept
                    copies.append((pages[j], page))
                pool.decref((pages[j],))
                pages[j] = page
        while len(pages) <= last:
            pages.append(fresh.pop())
        assert not fresh, "pages_needed and prepare_write disagree"
        return copies

    def mark_computed(self, end: int) -> None:
        """KV of slots up to `end` is now valid; recomputed committed pages rejoin the trie."""
        old = self.computed_len
        self.computed_len = end
        ps = self.space.page_size
        self._register(old // ps, min(end // ps, self.num_committed))
        if self.state_slot is not None and end - old > 1 and end % ps == 0:  # a prefill chunk ended on a page
            key = self._key_before(end // ps)
            if key is not None:
                assert self.space.states is not None
                self.space.states.checkpoint(key, self.state_slot)

    def suspend(self) -> int:
        """Drop every page (their content stays cached when the trie holds it); returns pages released.

        A swapped-out context keeps its host slots: its pages are then all
        before `swap_first`, recoverable from the trie or the record."""
        assert not self.in_batch and self.recomputable, "only idle, recomputable contexts are suspended"
        n = len(self.pages)
        self._drop_pages()
        return n

    def swap_span(self) -> tuple[int, int]:
        """(first page, number of pages) `swap_out` would copy to host.

        A recomputable context skips its leading trie pages that other
        contexts hold too (found again by key, or recomputed); one holding
        masked/adapter KV copies every computed page, since it must never be
        recomputed."""
        ps, trie, pool = self.space.page_size, self.space.trie, self.space.pool
        num_computed = min(len(self.pages), -(-self.computed_len // ps))
        first = 0
        if self.recomputable and self.state_slot is None:  # a hybrid's slot holds the state after every page
            while first < num_computed and trie.holds(self.pages[first]) and pool.refcount(self.pages[first]) > 1:
                first += 1
        return first, num_computed - first

    def swap_out(self, slots: list[int]) -> list[tuple[int, int]]:
        """Move the `swap_span` pages to `slots` and drop every page; returns (device_page, host_slot) pairs.

        The dropped pages may be handed out again in the same batch: that is
        safe because a batch runs its swap-outs before anything else."""
        assert not self.in_batch and not self.swapped, "only idle, resident contexts are swapped out"
        first, n = self.swap_span()
        assert len(slots) == n > 0, f"swap_out of {n} pages into {len(slots)} slots"
        pairs = list(zip(self.pages[first:first + n], slots, strict=True))
        self.swapped, self.swap_first, self.swapped_len = slots, first, self.computed_len
        self._drop_pages()
        return pairs

    @property
    def restorable(self) -> bool:
        """Swapped out, and every slot before the swapped pages is computed: swap them in next."""
        return bool(self.swapped) and self.computed_len == self.swap_first * self.space.page_size

    def restore(self, fresh: list[int]) -> list[tuple[int, int]]:
        """Swap the pages back in, onto pages taken off the end of `fresh`; returns (host_slot, page) pairs.

        Restored committed pages rejoin the trie only under keys it does not
        hold already: dedup would free a page this batch still swaps into."""
        assert self.restorable and len(self.pages) == self.swap_first, f"context {self.id} is not restorable"
        n = len(self.swapped)
        pages = fresh[len(fresh) - n:]
        del fresh[len(fresh) - n:]
        pairs = list(zip(self.swapped, pages, strict=True))
        self.pages += pages
        self.computed_len = self.swapped_len
        self._release_swap(0)
        trie, ps = self.space.trie, self.space.page_size
        for j in range(self.swap_first, min(self.num_committed, self.computed_len // ps)):
            key = self.keys[j]
            if key is not None and trie.lookup(key) is None:
                trie.insert(key, self.pages[j])
        return pairs

    def restore_limit(self) -> int:
        """The last slot the scheduler may compute before swapping the rest in (kv_len when not swapped)."""
        return self.swap_first * self.space.page_size if self.swapped else self.kv_len

    def freeable_pages(self) -> int:
        """Pages that suspending this context would make allocatable (held by no one else)."""
        rc = self.space.pool.refcount
        return sum(1 for p in self.pages if rc(p) == 1)

    def images_in(self, start: int, end: int) -> list[tuple[str, int]] | None:
        """`Request.images` of a request computing slots [start, end): (key, row of the image's first token)."""
        if not self.images:
            return None
        return [(p.key, p.slot - start) for p in overlapping(self.images, start, end)] or None

    def chunk_end(self, start: int, end: int) -> int:
        """A chunk [start, end) moved so it splits no image whose rows attend both ways."""
        return chunk_end(self.images, start, end) if self.images else end

    def request_pages(self, end: int) -> tuple[list[int], int]:
        """The page list and last-page fill of a request whose KV ends at slot `end`."""
        ps = self.space.page_size
        return self.pages[: (end - 1) // ps + 1], (end - 1) % ps + 1

    # -- helpers --------------------------------------------------------------------------------

    def _shared(self, page: int) -> bool:
        return self.space.pool.refcount(page) > 1 or self.space.trie.holds(page)

    def _content_key(self, parent: PageKey, j: int) -> PageKey:
        ps = self.space.page_size
        extra = page_extra(self.images, j * ps, (j + 1) * ps) if self.images else b""
        return page_key(parent, self.tokens[j * ps:(j + 1) * ps], self.positions[j * ps:(j + 1) * ps], extra)

    def _key_before(self, j: int) -> PageKey | None:
        """Key of page j - 1 (ROOT for j == 0); working pages are keyed on the fly."""
        if j <= self.num_committed:
            return self.keys[j - 1] if j else ROOT_KEY
        parent = self.keys[-1] if self.num_committed else ROOT_KEY
        for i in range(self.num_committed, j):
            if parent is None or i in self.dirty:
                return None
            parent = self._content_key(parent, i)
        return parent

    def _register(self, first: int, last: int) -> None:
        """Put committed pages [first, last) that hold valid KV into the trie (dedup against it)."""
        ps, pool, trie = self.space.page_size, self.space.pool, self.space.trie
        for j in range(first, min(last, len(self.pages), self.computed_len // ps)):
            key = self.keys[j]
            if key is None or trie.holds(self.pages[j]):
                continue
            canonical = trie.insert(key, self.pages[j]).page
            if canonical != self.pages[j]:
                pool.incref((canonical,))
                pool.decref((self.pages[j],))
                self.pages[j] = canonical

    def _drop_pages(self) -> None:
        pages, self.pages = self.pages, []
        self.computed_len = 0
        self.space.pool.decref(reversed(pages))

    def _release_swap(self, keep: int) -> None:
        """Keep the first `keep` swapped pages; their slots after that go back to the host pool."""
        if keep >= len(self.swapped):
            return
        host = self.space.host
        assert host is not None, "a context holds host slots, but the space has no host pool"
        host.release(self.swapped[keep:])
        del self.swapped[keep:]
        if not self.swapped:
            self.swap_first = self.swapped_len = 0

    def check_integrity(self) -> None:
        ps = self.space.page_size
        assert len(set(self.pages)) == len(self.pages), f"context {self.id} holds a page twice"
        assert self.computed_len <= len(self.pages) * ps, f"context {self.id}: computed slots outside its pages"
        assert self.computed_len <= self.kv_len <= self.num_pages * ps, f"context {self.id}: lengths out of order"
        assert len(self.keys) == self.num_committed <= self.num_pages
        assert len(self.positions) == len(self.tokens)
        if self.swapped:
            first, end = self.swap_first, self.swap_first + len(self.swapped)
            assert len(self.pages) <= first, f"context {self.id} holds device pages where its swapped pages go"
            assert self.computed_len <= first * ps, f"context {self.id}: computed slots past its swapped pages"
            assert first * ps < self.swapped_len <= min(end * ps, self.kv_len), (
                f"context {self.id}: swapped pages [{first}, {end}) hold slots up to {self.swapped_len}")
