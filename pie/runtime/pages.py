"""The KV page pools of one engine: refcounted device page ids, and host swap slots; no tensors.

Every device page is in exactly one state:

- free: refcount 0, on the free list, content meaningless;
- used: refcount > 0 (held by contexts, snapshots, pending copies);
- cached: refcount 0 but *retained* (registered in the prefix trie), content
  kept for reuse and reclaimed least-recently-released first when the free
  list runs dry.

Invariant (`check_integrity`): free + used + cached == total, no page is in two
states, refcounts are never negative. Queries and mutations are paired
(`can_allocate` / `allocate`); the runtime asks first and suspends contexts
when the answer is no, so `allocate` failing is an internal bug, not a user
error.

`HostSlotPool` is the same bookkeeping for the engine's host swap pool, the
slots suspended contexts' pages are copied to (see `HostSlotPool`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from pie.errors import OutOfPagesError


class PoolUsage(NamedTuple):
    total: int
    free: int
    used: int
    cached: int


class PagePool:
    def __init__(self, num_pages: int) -> None:
        assert num_pages > 0, f"a page pool needs pages, got {num_pages}"
        self.num_pages = num_pages
        self._refcount = [0] * num_pages
        self._retained = [False] * num_pages
        # Popped from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._cached: dict[int, None] = {}  # insertion order = LRU order (oldest first)
        self._on_evict: Callable[[int], None] | None = None
        self._on_free: Callable[[], None] | None = None

    def set_hooks(self, on_evict: Callable[[int], None] | None = None,
                  on_free: Callable[[], None] | None = None) -> None:
        """on_evict(page): a cached page is being reclaimed (the trie forgets it).
        on_free(): pages became allocatable (the scheduler retries waiting passes)."""
        if on_evict is not None:
            self._on_evict = on_evict
        if on_free is not None:
            self._on_free = on_free

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free) - len(self._cached)

    @property
    def num_allocatable(self) -> int:
        return len(self._free) + len(self._cached)

    def usage(self) -> PoolUsage:
        return PoolUsage(self.num_pages, self.num_free, self.num_used, self.num_cached)

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def is_retained(self, page: int) -> bool:
        return self._retained[page]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free) + len(self._cached)

    # -- mutations ------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with refcount 1; evicts cached pages (LRU) when the free list runs dry."""
        if n > len(self._free) + len(self._cached):
            raise OutOfPagesError(f"need {n} KV pages, only {self.num_allocatable} of {self.num_pages} can be "
                                  "freed; finish or release contexts, or raise the KV budget")
        while len(self._free) < n:
            self._evict_oldest()
        pages = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Take another reference; a cached page becomes used again (a prefix-cache hit)."""
        rc = self._refcount
        for p in pages:
            if rc[p] == 0:
                assert self._retained[p], f"incref of free page {p}"
                del self._cached[p]
            rc[p] += 1

    def decref(self, pages: Iterable[int]) -> None:
        """Drop a reference; at zero a retained page becomes cached, any other page free.

        Release a chain tail-first so its deepest pages are the oldest in the LRU
        order and are evicted before the prefixes they extend."""
        rc = self._refcount
        freed = False
        for p in pages:
            assert rc[p] > 0, f"decref of page {p} with refcount {rc[p]}"
            rc[p] -= 1
            if rc[p] == 0:
                freed = True
                if self._retained[p]:
                    self._cached[p] = None
                else:
                    self._free.append(p)
        if freed and self._on_free is not None:
            self._on_free()

    def retain(self, page: int) -> None:
        """Keep `page`'s content when its refcount reaches zero (it is registered in the trie)."""
        assert self._refcount[page] > 0, f"retain of unreferenced page {page}"
        self._retained[page] = True

    def _evict_oldest(self) -> None:
        page = next(iter(self._cached))
        del self._cached[page]
        self._retained[page] = False
        if self._on_evict is not None:
            self._on_evict(page)
        self._free.append(page)

    def evict_all(self) -> int:
        """Drop every cached page (tests, and operators who want a cold cache); returns how many."""
        n = len(self._cached)
        while self._cached:
            self._evict_oldest()
        return n

    # -- invariants -----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & cached, f"pages both free and cached: {sorted(free & cached)[:8]}"
        for p in range(self.num_pages):
            rc = self._refcount[p]
            assert rc >= 0, f"page {p} has refcount {rc}"
            in_free, in_cached = p in free, p in cached
            if rc > 0:
                assert not in_free and not in_cached, f"used page {p} (refcount {rc}) is also free or cached"
            else:
                assert in_free or in_cached, f"page {p} has refcount 0 but is neither free nor cached (leaked)"
                assert in_cached == self._retained[p], f"page {p}: cached={in_cached}, retained={self._retained[p]}"
        assert self.num_free + self.num_used + self.num_cached == self.num_pages


class HostSlotPool:
    """The engine's host swap slots (`EngineInfo.num_swap_slots`): where suspended contexts' pages wait.

    Every slot is in exactly one state:

    - free: allocatable;
    - held: holds one page of exactly one suspended context (slots are never
      shared: a fork of a swapped-out context recomputes instead);
    - draining: given up while a batch is being built (swapped back in, or
      its context destroyed or cut). A batch copies swap-outs *before*
      swap-ins, so a slot read by this batch's swap-in must not be the target
      of one of its swap-outs; and a slot a swap-out of this batch writes may
      be given up by a rollback in the same build. Draining slots become free
      at `settle()`, which the scheduler calls when no batch is being built
      or in flight.

    Invariant (`check_integrity`): free + held + draining == total.
    """

    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0, f"a host slot pool needs slots, got {num_slots}"
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: low slots first
        self._held = [False] * num_slots
        self._draining: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return self.num_slots - len(self._free) - len(self._draining)

    def is_held(self, slot: int) -> bool:
        return self._held[slot]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free slots, now held; the caller asked `can_allocate` first."""
        assert n <= len(self._free), f"need {n} host slots, {len(self._free)} are free"
        slots = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        for s in slots:
            self._held[s] = True
        return slots

    def release(self, slots: Iterable[int]) -> None:
        """Give held slots up; they drain until the next `settle()`."""
        for s in slots:
            assert self._held[s], f"release of host slot {s}, which is not held"
            self._held[s] = False
            self._draining.append(s)

    def settle(self) -> None:
        """No batch is being built or in flight: draining slots are free again."""
        if self._draining:
            self._free += self._draining
            self._draining.clear()

    def check_integrity(self) -> None:
        free, draining = set(self._free), set(self._draining)
        assert len(free) == len(self._free) and len(draining) == len(self._draining), "a host slot is listed twice"
        assert not free & draining, f"host slots both free and draining: {sorted(free & draining)[:8]}"
        for s in range(self.num_slots):
            listed = s in free or s in draining
            assert listed != self._held[s], f"host slot {s}: held={self._held[s]}, free or draining={listed}"
