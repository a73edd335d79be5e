"""Binary run-length encoding (BRLE): the mask format of attention and logit masks.

Runs alternate and start with a *false* run, so a mask that starts true has a
leading 0: `[True, True, False]` -> `[0, 2, 1]`. True means "attend" in an
attention mask and "allowed" in a logit mask. `[]` as a logit mask means no
restriction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Brle = list[int]


def encode(mask: Sequence[bool] | np.ndarray) -> Brle:
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        return []
    change = np.flatnonzero(m[1:] != m[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [m.size]))).tolist()
    return [0, *runs] if m[0] else runs


def decode(runs: Sequence[int], length: int | None = None) -> np.ndarray:
    """BRLE -> bool array; with `length`, shorter masks are padded with False and longer ones refused."""
    r = np.asarray(runs, dtype=np.int64)
    if r.size and r.min() < 0:
        raise ValueError(f"BRLE run lengths must be >= 0, got {list(runs)[:8]}")
    out = np.repeat((np.arange(r.size) % 2) == 1, r)
    if length is not None:
        if out.size > length:
            raise ValueError(f"BRLE covers {out.size} entries, more than {length}")
        out = np.pad(out, (0, length - out.size))
    return out


def size(runs: Sequence[int]) -> int:
    return int(sum(runs))


def all_true(n: int) -> Brle:
    return [0, n] if n > 0 else []


def all_false(n: int) -> Brle:
    return [n] if n > 0 else []


def from_ranges(n: int, ranges: Iterable[tuple[int, int]]) -> Brle:
    """True on each half-open [start, end) range, false elsewhere, over n entries."""
    m = np.zeros(n, dtype=bool)
    for start, end in ranges:
        m[max(start, 0):min(end, n)] = True
    return encode(m)


def from_tokens(vocab_size: int, allowed: Iterable[int]) -> Brle:
    """A logit mask allowing exactly `allowed`."""
    m = np.zeros(vocab_size, dtype=bool)
    m[np.fromiter(allowed, dtype=np.int64)] = True
    return encode(m)


def and_(*masks: Sequence[int]) -> Brle:
    """Intersection of logit masks; `[]` (no restriction) is the identity."""
    real = [m for m in masks if m]
    if not real:
        return []
    n = max(size(m) for m in real)
    out = np.ones(n, dtype=bool)
    for m in real:
        out &= decode(m, n)
    return encode(out)


def or_(a: Sequence[int], b: Sequence[int]) -> Brle:
    n = max(size(a), size(b))
    return encode(decode(a, n) | decode(b, n))


def not_(a: Sequence[int]) -> Brle:
    return encode(~decode(a))


def is_allowed(runs: Sequence[int], index: int) -> bool:
    """Whether entry `index` is true; `[]` allows everything."""
    if not runs:
        return True
    pos = 0
    for i, run in enumerate(runs):
        pos += run
        if index < pos:
            return i % 2 == 1
    return False


def from_bitmask(bitmask: np.ndarray, vocab_size: int) -> Brle:
    """A packed little-endian int32 bitmask (llguidance's format) -> BRLE over `vocab_size`."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8), bitorder="little")
    return encode(bits[:vocab_size].astype(bool))
