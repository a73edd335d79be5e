"""Rate limits and rate-limited logging for the network front.

- `TokenBucket`: `burst` tokens, refilled at `per_s`; `take()` spends one if there is one.
- `AddressBuckets`: one bucket per client address, with a bounded number of addresses (full buckets,
  which hold no information, are dropped first; then the oldest).
- `RepeatFilter`: a `logging.Filter` that lets the first record of a kind through and then one
  summary per interval ("... (1,234 more like this in the last 10 s)"), so an error repeated
  thousands of times a second (`accept()` out of file descriptors, a client hammering a bad frame)
  cannot fill the disk with tracebacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    def __init__(self, burst: float, per_s: float, clock: Clock = time.monotonic) -> None:
        assert burst >= 1 and per_s >= 0, f"a bucket needs burst >= 1 and per_s >= 0, got {burst}, {per_s}"
        self.burst, self.per_s = float(burst), float(per_s)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def retry_after_s(self) -> float:
        """Seconds until a token is available (inf when the bucket never refills)."""
        self._refill()
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self.per_s if self.per_s > 0 else float("inf")

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
        self._at = now


class AddressBuckets:
    """A `TokenBucket` per client address, at most `max_addresses` of them."""

    def __init__(self, burst: float, per_s: float, *, max_addresses: int = 4096,
                 clock: Clock = time.monotonic) -> None:
        self.burst, self.per_s = burst, per_s
        self._max = max_addresses
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, address: str) -> TokenBucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._prune()
            bucket = self._buckets[address] = TokenBucket(self.burst, self.per_s, self._clock)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self) -> None:
        for address in [a for a, b in self._buckets.items() if b.full]:
            del self._buckets[address]
        while len(self._buckets) >= self._max:
            del self._buckets[next(iter(self._buckets))]


class RepeatFilter(logging.Filter):
    """Pass the first record of each (logger, message template) per `interval_s`; count the rest and
    report the count on the first record after the interval. Tracebacks of repeats are dropped."""

    def __init__(self, interval_s: float = 10.0, clock: Clock = time.monotonic, max_kinds: int = 1024) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # kind -> (window start, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, str(record.msg).split("\n", 1)[0][:200])  # asyncio appends per-socket details
        now = self._clock()
        start, suppressed = self._seen.get(kind, (-float("inf"), 0))
        if now - start < self.interval_s:
            self._seen[kind] = (start, suppressed + 1)
            return False
        if len(self._seen) >= self._max_kinds and kind not in self._seen:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like this in the last {now - start:.0f} s)"
        return True

    def suppressed(self) -> int:
        """Records held back in the current windows (for tests and the shutdown summary)."""
        return sum(count for _, count in self._seen.values())
