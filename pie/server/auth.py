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

The pending challenge lives on the connection's `Handshake`, one at a time
(a new `auth_identify` replaces it) and for `CHALLENGE_TTL_S`: connections
flooding `auth_identify` cannot evict anybody else's challenge, and the
server holds at most one challenge per connection. Attempts are rate limited
per connection (every attempt) and per client address (refused attempts);
an attempt over a limit is refused, and `MAX_FAILURES` refusals close the
connection.

Some usernames belong to the server itself (`RESERVED_USERNAMES`: the OpenAI
endpoint runs its processes as `openai`, the internal token defaults to
`internal`); no client may identify as one, and `pie auth add` refuses them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from pie.server.limits import AddressBuckets, Clock, TokenBucket

log = logging.getLogger(__name__)

CHALLENGE_BYTES = 48
CHALLENGE_TTL_S = 60.0  # a proof must come within this of its challenge
MAX_FAILURES = 3  # refused attempts before the connection is closed
MAX_USERNAME_CHARS = 64
# Names the server acts under itself: `openai` (pie.server.openai.USERNAME), `anthropic` (its sibling
# endpoint), `internal` (the internal token without a username). A client posing as one would see
# and steer those processes.
RESERVED_USERNAMES = frozenset({"openai", "anthropic", "internal"})


class KeyStore(Protocol):
    def has_user(self, username: str) -> bool: ...
    def verify(self, username: str, message: bytes, signature: bytes) -> bool: ...  # any of the user's keys


def new_internal_token() -> str:
    return secrets.token_urlsafe(CHALLENGE_BYTES)


@dataclass(frozen=True)
class Reply:
    ok: bool
    result: str


@dataclass(frozen=True)
class AuthLimits:
    """Rate limits on authentication attempts (defaults as in ServerOptions)."""

    attempts_burst: int = 10  # per connection: attempts at once ...
    attempts_per_s: float = 2.0  # ... and the sustained rate
    address_failures_burst: int = 50  # per client address: refused attempts at once ...
    address_failures_per_s: float = 1.0  # ... and forgiven per second


class Authenticator:
    """Server-wide auth settings and the per-address limits; `handshake()` makes the per-connection state."""

    def __init__(self, *, enabled: bool, keys: KeyStore | None, token: str, limits: AuthLimits | None = None,
                 clock: Clock = time.monotonic) -> None:
        assert not enabled or keys is not None, "auth on needs a keystore"
        self.enabled = enabled
        self.keys = keys
        self.token = token
        self.limits = limits or AuthLimits()
        self.clock = clock
        self.failures_by_address = AddressBuckets(self.limits.address_failures_burst,
                                                  self.limits.address_failures_per_s, clock=clock)

    def handshake(self, address: str = "?") -> Handshake:
        return Handshake(self, address)


@dataclass(frozen=True)
class _Challenge:
    username: str
    nonce: bytes
    deadline: float


class Handshake:
    def __init__(self, auth: Authenticator, address: str = "?") -> None:
        self._auth = auth
        self.address = address
        self.username: str | None = None  # set once authenticated
        self.failures = 0
        self._pending: _Challenge | None = None  # the one challenge awaiting a proof on this connection
        self._attempts = TokenBucket(auth.limits.attempts_burst, auth.limits.attempts_per_s, auth.clock)

    @property
    def authenticated(self) -> bool:
        return self.username is not None

    @property
    def exhausted(self) -> bool:
        return self.failures >= MAX_FAILURES

    def identify(self, username: str) -> Reply:
        if self.authenticated:
            return Reply(True, "already authenticated")
        limited = self._rate_limited()
        if limited is not None:
            return limited
        problem = username_problem(username) or reserved_problem(username)
        if problem:
            return self._refuse(problem)
        if not self._auth.enabled:
            self.username = username
            return Reply(True, "authenticated (the server has authentication disabled)")
        assert self._auth.keys is not None
        if not self._auth.keys.has_user(username):
            return self._refuse(f"user {username!r} is not authorized; the operator adds it with "
                                f"`pie auth add {username}`")
        nonce = secrets.token_bytes(CHALLENGE_BYTES)
        self._pending = _Challenge(username, nonce, self._auth.clock() + CHALLENGE_TTL_S)
        return Reply(True, base64.b64encode(nonce).decode("ascii"))

    def prove(self, signature_b64: str) -> Reply:
        if self.authenticated:
            return Reply(False, "already authenticated")
        limited = self._rate_limited()
        if limited is not None:
            return limited
        pending, self._pending = self._pending, None
        if pending is None:
            return self._refuse("no challenge is pending; send auth_identify first")
        if self._auth.clock() > pending.deadline:
            return self._refuse(f"the challenge expired ({CHALLENGE_TTL_S:g} s to answer it); identify again")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            return self._refuse("the signature is not valid base64")
        assert self._auth.keys is not None
        if not self._auth.keys.verify(pending.username, pending.nonce, signature):
            return self._refuse(f"the signature matches none of the keys of user {pending.username!r}")
        self.username = pending.username
        return Reply(True, "authenticated")

    def by_token(self, token: str, username: str | None) -> Reply:
        if self.authenticated:
            return Reply(True, "already authenticated")
        limited = self._rate_limited()
        if limited is not None:
            return limited
        if not hmac.compare_digest(token.encode(), self._auth.token.encode()):
            return self._refuse("the internal token is wrong")
        name = username or "internal"  # the token holder is the operator: reserved names are theirs
        problem = username_problem(name)
        if problem:
            return self._refuse(problem)
        self.username = name
        return Reply(True, "authenticated")

    def _rate_limited(self) -> Reply | None:
        """A refusal when this connection or its address is over its limit, else None."""
        limits = self._auth.limits
        if not self._attempts.take():
            return self._refuse(f"too many authentication attempts on this connection (at most "
                                f"{limits.attempts_burst} at once, then {limits.attempts_per_s:g} per s); "
                                f"retry in {self._attempts.retry_after_s():.1f} s")
        if self._auth.failures_by_address.bucket(self.address).retry_after_s() > 0:
            return self._refuse(f"too many refused authentication attempts from {self.address} (at most "
                                f"{limits.address_failures_burst}, then {limits.address_failures_per_s:g} per s); "
                                "retry later")
        return None

    def _refuse(self, why: str) -> Reply:
        self.failures += 1
        self._auth.failures_by_address.bucket(self.address).take()
        log.info("auth refused for %s: %s", self.address, why)
        return Reply(False, why)


def bearer_matches(header: str, token: str) -> bool:
    """Does an `Authorization` header carry `Bearer <token>` (compared in constant time)?"""
    given = header.removeprefix("Bearer ").strip()
    return header.startswith("Bearer ") and hmac.compare_digest(given.encode(), token.encode())


def username_problem(username: str) -> str | None:
    """Why `username` is unusable, or None. Names scope snapshots and topics, so keep them plain."""
    if not username or len(username) > MAX_USERNAME_CHARS:
        return f"username must be 1 to {MAX_USERNAME_CHARS} characters, got {len(username)}"
    if not username.isprintable() or any(c.isspace() for c in username):
        return f"username {username!r} holds whitespace or control characters; use a plain name"
    return None


def reserved_problem(username: str) -> str | None:
    """Why `username` may not be a client's name (the server acts under it itself), or None."""
    if username.lower() in RESERVED_USERNAMES:
        return (f"username {username!r} is reserved: the server runs its own processes under it "
                f"(reserved: {', '.join(sorted(RESERVED_USERNAMES))}); pick another name")
    return None
