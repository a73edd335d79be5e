"""Binary run-length encoding (BRLE), the mask format of the inferlet API.

Runs alternate and start with a *false* run: [true, true, false] -> [0, 2, 1].
True means "attend" for attention masks and "allowed" for logit masks.
"""

from __future__ import annotations

import numpy as np


def decode(runs: list[int] | np.ndarray, length: int | None = None) -> np.ndarray:
    """BRLE -> bool array. With `length`, the runs must cover exactly that many entries."""
    r = np.asarray(runs, dtype=np.int64)
    if r.size and r.min() < 0:
        raise ValueError("BRLE run lengths must be >= 0")
    values = (np.arange(r.size) % 2) == 1
    out = np.repeat(values, r)
    if length is not None and out.size != length:
        raise ValueError(f"BRLE covers {out.size} entries, expected {length}")
    return out


def encode(mask: np.ndarray | list[bool]) -> list[int]:
    """bool array -> BRLE (the inverse of `decode`)."""
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        return []
    change = np.flatnonzero(m[1:] != m[:-1]) + 1
    bounds = np.concatenate(([0], change, [m.size]))
    runs = np.diff(bounds).tolist()
    return ([0, *runs]) if m[0] else runs
