"""Byte-budgeted LRU maps of the engine's images: prepared pixels and encoder outputs, keyed by content hash.

The same image (same bytes, same hash) is prepared and encoded once while its
entry stays in budget; `encoded` counts the images the tower really ran on,
`encoder_calls` the tower calls (one per batch that needed any), so tests can
assert what was recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUBytes(Generic[V]):
    """key -> value, evicting least recently used entries while the sum of `size(value)` exceeds `budget`.

    An entry larger than the whole budget is still kept (alone): the pass that needs it must be able to run.
    """

    def __init__(self, budget: int, size: Callable[[V], int]) -> None:
        self.budget, self._size = budget, size
        self._items: OrderedDict[str, V] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V, keep: frozenset[str] = frozenset()) -> None:
        """Insert `key`; evict old entries (never those in `keep`, the keys the current pass uses)."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= self._size(old)
        self._items[key] = value
        self.bytes += self._size(value)
        for victim in [k for k in self._items if k != key and k not in keep]:
            if self.bytes <= self.budget:
                break
            self.bytes -= self._size(self._items.pop(victim))


class EncodeStats:
    """Counters of the tower's work, read by tests and metrics."""

    def __init__(self) -> None:
        self.encoder_calls = 0
        self.encoded = 0
        self.cache_hits = 0
        self.reprepared = 0  # images prepared again from their bytes after their pixels were evicted
