"""The recurrent-state slots of a hybrid model's engine (`EngineInfo.num_state_slots`): who holds which; no tensors.

A hybrid model (Qwen 3.5, Qwen3-Next, Nemotron-H) keeps, beside the KV pages of
its full-attention layers, one fixed-size state per sequence for its recurrent
layers (`pie.engine.state_pool`). Every context of such a model holds one slot
from its creation to its destruction; every request of the context names it
(`Request.state_slot`). The slot holds the state after the context's first
`computed_len` tokens (`Context` keeps that true: anything that would leave
the state past the record's end sends the context back to recomputation from
slot 0, see `Context._cut`).

Slots are not shared: a fork takes a new slot and queues a copy of the
parent's (`copy`), which the next batch the scheduler builds carries in
`ForwardBatch.state_copies` (`drain`). Copies run on the engine before that
batch's forward, all sources read before any destination is written, so the
queue is kept in terms of the states as they are *now*: a copy out of a slot
that is itself the destination of a queued copy reads that copy's source
instead (a fork of a fork), and freeing a slot forgets the copies queued into
it (its next holder starts fresh or queues its own copy).

Prefix checkpoints: a slot may also hold the state after a committed-page
boundary of some prompt, keyed by that page's content key (the key chains every
token and position before it, so the state is a function of it). The scheduler
ends hybrid prefill chunks at page boundaries so those states exist; the
context that computed one queues a copy of its slot into a checkpoint slot
(`checkpoint`), and a later prompt whose pages match the trie up to a
checkpointed page attaches those pages and copies the checkpoint into its own
slot (`Context.attach_cached`). Checkpoints take only slots no context holds,
and are evicted least recently used first when a new context needs a slot or
a newer checkpoint needs room; they cost no memory beyond the engine's pool,
which is allocated whole at start.

Invariant (`check_integrity`): free + held == total, no slot both; held = contexts' slots + checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict

from inferlet._host import HostError


class StateSlots:
    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0, f"a state slot pool needs slots, got {num_slots}"
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: low slots first
        self._held = [False] * num_slots
        self._copies: dict[int, int] = {}  # dst -> src, in the states as they are before the next batch
        self._checkpoints: OrderedDict[object, int] = OrderedDict()  # page key -> slot, least recently used first

    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return self.num_slots - len(self._free)

    def is_held(self, slot: int) -> bool:
        return self._held[slot]

    def allocate(self) -> int:
        """A free slot, now held (evicting the oldest prefix checkpoint when none is free); a HostError with the
        numbers and the fix when contexts hold them all."""
        if not self._free and self._checkpoints:
            self.free(self._checkpoints.popitem(last=False)[1])
        if not self._free:
            raise HostError(f"all {self.num_slots} recurrent-state slots of this hybrid model are held by live "
                            "contexts (one each, forks and snapshots included); destroy contexts or delete "
                            "snapshots, or raise max_num_state_slots")
        slot = self._free.pop()
        self._held[slot] = True
        return slot

    def free(self, slot: int) -> None:
        assert self._held[slot], f"free of state slot {slot}, which is not held"
        self._held[slot] = False
        self._copies.pop(slot, None)  # a copy into it is of no use to its next holder
        self._free.append(slot)

    def copy(self, src: int, dst: int) -> None:
        """Queue `dst := src` for the next batch (`drain`)."""
        assert self._held[src] and self._held[dst] and src != dst, (src, dst)
        self._copies[dst] = self._copies.get(src, src)

    def checkpoint(self, key: object, src: int) -> None:
        """Keep a copy of `src` (the state after the page keyed `key`) in a slot nobody holds: a free one, else
        the oldest checkpoint's. Nothing when the key has one already or every slot is a context's."""
        if key in self._checkpoints:
            self._checkpoints.move_to_end(key)
            return
        if not self._free:
            if not self._checkpoints:
                return
            self.free(self._checkpoints.popitem(last=False)[1])
        slot = self.allocate()
        self._checkpoints[key] = slot
        self.copy(src, slot)

    def has_checkpoint(self, key: object) -> bool:
        return key in self._checkpoints

    def lookup(self, key: object) -> int | None:
        """The checkpoint slot of `key` (now the most recently used), or None."""
        slot = self._checkpoints.get(key)
        if slot is not None:
            self._checkpoints.move_to_end(key)
        return slot

    def drain(self) -> list[tuple[int, int]]:
        """The queued copies as (src, dst) pairs, for the batch being built; the queue is then empty."""
        if not self._copies:
            return []
        pairs = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        return pairs

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a state slot is on the free list twice"
        for s in range(self.num_slots):
            assert (s in free) != self._held[s], f"state slot {s}: held={self._held[s]}, free={s in free}"
        for dst in self._copies:
            assert self._held[dst], f"a copy is queued into state slot {dst}, which nobody holds"
        ckpt = list(self._checkpoints.values())
        assert len(set(ckpt)) == len(ckpt) and all(self._held[s] for s in ckpt), f"checkpoint slots {ckpt}"
