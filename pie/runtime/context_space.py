"""The contexts of one page pool: the pool, the prefix trie, the host swap slots, and every live context."""

from __future__ import annotations

import itertools

from pie.runtime.context import Context
from pie.runtime.pages import HostSlotPool, PagePool
from pie.runtime.prefix_trie import PrefixTrie
from pie.runtime.state_slots import StateSlots


class ContextSpace:
    """One model's contexts: the shared pool and trie, and the registry of live contexts.

    `host` is the engine's host swap pool; the scheduler sets it when the engine has one. `states` is a
    hybrid model's recurrent-state slots (`EngineInfo.num_state_slots`): then every context holds one."""

    def __init__(self, pool: PagePool, trie: PrefixTrie, page_size: int) -> None:
        self.pool = pool
        self.trie = trie
        self.page_size = page_size
        self.host: HostSlotPool | None = None
        self.states: StateSlots | None = None
        self.live: dict[int, Context] = {}
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)

    def create(self, owner: str) -> Context:
        slot = self.states.allocate() if self.states is not None else None  # HostError when all are held
        ctx = Context(self, owner, next(self._ids))
        ctx.state_slot = slot
        self.live[ctx.id] = ctx
        return ctx

    def tick(self) -> int:
        return next(self._clock)

    def check_integrity(self) -> None:
        """Pools, trie and every live context agree: each page's refcount is its number of holders,
        and each held host slot belongs to exactly one live context."""
        self.pool.check_integrity()
        self.trie.check_integrity()
        holders = [0] * self.pool.num_pages
        slot_holders: dict[int, int] = {}
        for ctx in self.live.values():
            ctx.check_integrity()
            for p in ctx.pages:
                holders[p] += 1
            for s in ctx.swapped:
                assert s not in slot_holders, f"host slot {s} held by contexts {slot_holders[s]} and {ctx.id}"
                slot_holders[s] = ctx.id
        for p, n in enumerate(holders):
            assert self.pool.refcount(p) == n, f"page {p}: refcount {self.pool.refcount(p)}, held by {n} contexts"
        if self.states is not None:
            self.states.check_integrity()
            slots = [c.state_slot for c in self.live.values()]
            assert None not in slots and len(set(slots)) == len(slots), f"state slots of live contexts: {slots}"
            assert self.states.num_held == len(slots) + self.states.num_checkpoints, (
                f"{self.states.num_held} state slots are held, live contexts hold {len(slots)} and "
                f"{self.states.num_checkpoints} are prefix checkpoints (leaked)")
        if self.host is None:
            assert not slot_holders, "contexts hold host slots but the space has no host pool"
            return
        self.host.check_integrity()
        for s in slot_holders:
            assert self.host.is_held(s), f"context {slot_holders[s]} holds host slot {s}, which the pool has not lent"
        assert self.host.num_held == len(slot_holders), (
            f"{self.host.num_held} host slots are held, live contexts hold {len(slot_holders)} (leaked)")
