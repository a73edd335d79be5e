"""The authentication handshake of one connection, on top of `pie.auth`.

- `auth_identify {username}`: with auth off the user is in at once
  ("authenticated"). With auth on, a known user gets a fresh 48-byte challenge
  (standard base64); an unknown one is refused.
- `auth_prove {signature}`: base64 signature of the raw challenge bytes by any
  of the user's keys. The challenge is consumed by the first attempt, right
  or wrong, so a signature can never be replayed (not on this connection, and
  not on another one, which gets its own challenge).
- `auth_by_token {token}`: the server's per-start internal token (48 random
  bytes, URL-safe base64), which `pie run` uses against the server it starts.

Until one of these succeeds, the session answers nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

CHALLENGE_BYTES = 48
MAX_FAILURES = 3  # refused attempts before the connection is closed
MAX_USERNAME_CHARS = 64


class KeyStore(Protocol):
    def has_user(self, username: str) -> bool: ...
    def verify(self, username: str, message: bytes, signature: bytes) -> bool: ...  # any of the user's keys


class Challenger(Protocol):
    def issue(self) -> bytes: ...  # a fresh nonce of CHALLENGE_BYTES bytes
    def consume(self, nonce: bytes) -> bool: ...  # True once per issued nonce


def new_internal_token() -> str:
    return secrets.token_urlsafe(CHALLENGE_BYTES)


@dataclass(frozen=True)
class Reply:
    ok: bool
    result: str


class Authenticator:
    """Server-wide auth settings; `handshake()` makes the per-connection state."""

    def __init__(self, *, enabled: bool, keys: KeyStore | None, challenger: Challenger | None,
                 token: str) -> None:
        assert not enabled or (keys is not None and challenger is not None), "auth on needs keys and a challenger"
        self.enabled = enabled
        self.keys = keys
        self.challenger = challenger
        self.token = token

    def handshake(self) -> Handshake:
        return Handshake(self)


class Handshake:
    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        self.username: str | None = None  # set once authenticated
        self.failures = 0
        self._pending: tuple[str, bytes] | None = None  # (username, challenge) awaiting a proof

    @property
    def authenticated(self) -> bool:
        return self.username is not None

    @property
    def exhausted(self) -> bool:
        return self.failures >= MAX_FAILURES

    def identify(self, username: str) -> Reply:
        if self.authenticated:
            return Reply(True, "already authenticated")
        problem = username_problem(username)
        if problem:
            return self._refuse(problem)
        if not self._auth.enabled:
            self.username = username
            return Reply(True, "authenticated (the server has authentication disabled)")
        assert self._auth.keys is not None and self._auth.challenger is not None
        if not self._auth.keys.has_user(username):
            return self._refuse(f"user {username!r} is not authorized; the operator adds it with "
                                f"`pie auth add {username}`")
        challenge = self._auth.challenger.issue()
        self._pending = (username, challenge)
        return Reply(True, base64.b64encode(challenge).decode("ascii"))

    def prove(self, signature_b64: str) -> Reply:
        if self.authenticated:
            return Reply(False, "already authenticated")
        pending, self._pending = self._pending, None
        if pending is None:
            return self._refuse("no challenge is pending; send auth_identify first")
        username, challenge = pending
        assert self._auth.keys is not None and self._auth.challenger is not None
        if not self._auth.challenger.consume(challenge):
            return self._refuse("the challenge was already used or has expired; identify again")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            return self._refuse("the signature is not valid base64")
        if not self._auth.keys.verify(username, challenge, signature):
            return self._refuse(f"the signature matches none of the keys of user {username!r}")
        self.username = username
        return Reply(True, "authenticated")

    def by_token(self, token: str, username: str | None) -> Reply:
        if self.authenticated:
            return Reply(True, "already authenticated")
        if not hmac.compare_digest(token.encode(), self._auth.token.encode()):
            return self._refuse("the internal token is wrong")
        name = username or "internal"
        problem = username_problem(name)
        if problem:
            return self._refuse(problem)
        self.username = name
        return Reply(True, "authenticated")

    def _refuse(self, why: str) -> Reply:
        self.failures += 1
        log.info("auth refused: %s", why)
        return Reply(False, why)


def username_problem(username: str) -> str | None:
    """Why `username` is unusable, or None. Names scope snapshots and topics, so keep them plain."""
    if not username or len(username) > MAX_USERNAME_CHARS:
        return f"username must be 1 to {MAX_USERNAME_CHARS} characters, got {len(username)}"
    if not username.isprintable() or any(c.isspace() for c in username):
        return f"username {username!r} holds whitespace or control characters; use a plain name"
    return None
