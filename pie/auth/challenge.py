"""Single-use challenges: fresh 48-byte nonces, each bound to the user it was issued for.

A nonce is accepted once, by the user it was issued to, within `ttl_s` of its issue; after that it
is gone, so a captured signature can never be replayed. The pending set is bounded: past
`max_pending` the oldest nonces are dropped (their clients identify again).
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Protocol

CHALLENGE_BYTES = 48


class SignatureChecker(Protocol):
    def verify(self, username: str, message: bytes, signature: bytes) -> bool: ...


class Challenger:
    def __init__(self, keys: SignatureChecker | None = None, *, ttl_s: float = 60.0, max_pending: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_s > 0 and max_pending > 0, "a challenge must live a while and at least one must fit"
        self._keys = keys
        self._ttl_s = ttl_s
        self._max_pending = max_pending
        self._clock = clock
        self._pending: dict[bytes, tuple[str | None, float]] = {}  # nonce -> (user, deadline); oldest first

    def issue(self, username: str | None = None) -> bytes:
        """A fresh nonce of CHALLENGE_BYTES random bytes, for `username` (None: any user may answer it)."""
        self._expire()
        while len(self._pending) >= self._max_pending:
            self._pending.pop(next(iter(self._pending)))
        nonce = secrets.token_bytes(CHALLENGE_BYTES)
        self._pending[nonce] = (username, self._clock() + self._ttl_s)
        return nonce

    def issue_b64(self, username: str | None = None) -> str:
        """The nonce as the wire carries it (standard base64)."""
        return base64.b64encode(self.issue(username)).decode("ascii")

    def consume(self, nonce: bytes, username: str | None = None) -> bool:
        """True once per issued, unexpired nonce; a nonce issued for a user only to that user.
        Any attempt removes the nonce, right or wrong."""
        entry = self._pending.pop(nonce, None)
        if entry is None:
            return False
        owner, deadline = entry
        if self._clock() > deadline:
            return False
        return owner is None or username is None or owner == username

    def verify(self, username: str, nonce: bytes, signature: bytes) -> bool:
        """Consume `nonce` and check `signature` over it against any of the user's keys."""
        assert self._keys is not None, "verify needs the keystore the Challenger was made with"
        return self.consume(nonce, username) and self._keys.verify(username, nonce, signature)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        now = self._clock()
        # Deadlines grow with issue order (one ttl for all), so expired nonces are a prefix.
        while self._pending:
            first = next(iter(self._pending))
            if self._pending[first][1] > now:
                break
            del self._pending[first]
