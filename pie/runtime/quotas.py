"""Byte and rate quotas that bound what one instance or one user can make the server hold or do.

- `ByteQuota`: bytes held per user against one cap (buffered process events,
  queued messages). Callers `take` before holding and `give` back when they
  let go, in the same object, so the count never drifts.
- `TokenBucket`: a rate (events per second) with a burst (forks per second).

Both are plain counters on the event loop's thread: no locks.
"""

from __future__ import annotations

import time
from collections import defaultdict


def page_share(pool_pages: int, share: float) -> int:
    """The pages one instance may hold of a pool of `pool_pages` under `[runtime]
    max_page_share_per_instance = share` (0: no share limit, the whole pool); at least one."""
    return max(1, int(pool_pages * share)) if share else pool_pages


def size_of(value: str | bytes) -> int:
    """The bytes a buffered value holds, near enough: a str counts its characters."""
    return len(value)


class ByteQuota:
    """Bytes held per user; 0 = no cap. `key` is the config key that sets the cap (for messages)."""

    def __init__(self, cap: int, key: str) -> None:
        self.cap = cap
        self.key = key
        self._held: defaultdict[str, int] = defaultdict(int)

    def held(self, user: str) -> int:
        return self._held.get(user, 0)

    def fits(self, user: str, n: int) -> bool:
        return not self.cap or self.held(user) + n <= self.cap

    def take(self, user: str, n: int) -> None:
        self._held[user] += n

    def give(self, user: str, n: int) -> None:
        left = self._held[user] - n
        assert left >= 0, f"user {user!r} gave back {n} bytes of the {self._held[user]} held ({self.key})"
        if left:
            self._held[user] = left
        else:
            del self._held[user]

    def over(self, user: str, n: int, what: str) -> str:
        """The message for a refused `n` bytes: the numbers, the key and the fix."""
        return (f"{what} of {n} bytes would bring user {user!r} to {self.held(user) + n} bytes held, over "
                f"the limit of {self.cap} ([runtime] {self.key}); consume what is queued first, or raise "
                f"{self.key}")


class TokenBucket:
    """`rate` events per second on average, up to `burst` at once; rate 0 = unlimited."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def try_take(self) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
