"""`$PIE_HOME/authorized_users.toml`: who may connect, with which public keys.

    [users.alice.keys]
    laptop = "ssh-ed25519 AAAA... alice@laptop"
    ci = "ssh-rsa AAAA..."

`pie auth` writes it (mode 0600, replaced in one rename) and the server reads it; both find it
through `keystore_path()`, so they cannot disagree on where it is. The server's `KeyStore` reads the
file again whenever it changes on disk: `pie auth add/remove` take effect without a restart.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from pie.auth.keys import PublicKey, fingerprint, key_type, openssh_line, parse_public_key, verify_signature
from pie.config import pie_home
from pie.config_io import atomic_write
from pie.errors import AuthError, ConfigError
from pie.server.auth import reserved_problem, username_problem

log = logging.getLogger(__name__)

KEYSTORE_FILE = "authorized_users.toml"
FILE_MODE = 0o600


def keystore_path(home: Path | None = None) -> Path:
    """The one place `pie auth` writes and `pie serve` reads: `$PIE_HOME/authorized_users.toml`."""
    return (home or pie_home()) / KEYSTORE_FILE


@dataclass(frozen=True)
class AuthorizedKey:
    user: str
    name: str
    key: PublicKey
    text: str  # as stored: the OpenSSH line plus any comment

    @property
    def type(self) -> str:
        return key_type(self.key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


Users = dict[str, dict[str, AuthorizedKey]]  # user -> key name -> key


class KeyStore:
    """The authorized users of one file. `has_user`/`verify` are what the server's handshake calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of what _users holds
        self._users: Users = read_users(path)  # a broken file fails here, at startup
        self._stamp = _stamp(path)

    def users(self) -> Users:
        self._refresh()
        return self._users

    def keys(self, user: str) -> list[AuthorizedKey]:
        return list(self.users().get(user, {}).values())

    def has_user(self, username: str) -> bool:
        return bool(self.keys(username))

    def verify(self, username: str, message: bytes, signature: bytes) -> bool:
        """True when any of the user's keys verifies `signature` over `message`."""
        return any(verify_signature(k.key, message, signature) for k in self.keys(username))

    def _refresh(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            self._users = read_users(self.path)
        except ConfigError as error:  # fail closed: nobody gets in until the file is fixed
            log.error("%s; refusing every key until it is fixed", error)
            self._users = {}
        self._stamp = stamp


def read_users(path: Path) -> Users:
    """Parse the whole file; a missing file means no users. Reserved names (the server's own) are
    skipped with a warning: nobody may log in as them."""
    raw = _read_raw(path)
    users: Users = {}
    for user, entry in raw.get("users", {}).items():
        reserved = reserved_problem(user)
        if reserved:
            log.warning("%s: ignoring users.%s: %s (remove it with `pie auth remove %s`)", path, user, reserved, user)
            continue
        if not isinstance(entry, Mapping) or not isinstance(entry.get("keys", {}), Mapping):
            raise ConfigError(f"{path}: users.{user} must hold a [users.{user}.keys] table; "
                              f"re-add the user with `pie auth add {user}`")
        users[user] = {}
        for name, text in entry.get("keys", {}).items():
            if not isinstance(text, str):
                raise ConfigError(f"{path}: users.{user}.keys.{name} must be a public key string")
            try:
                users[user][name] = AuthorizedKey(user, name, parse_public_key(text), text)
            except AuthError as error:
                raise ConfigError(f"{path}: users.{user}.keys.{name}: {error}; remove it with "
                                  f"`pie auth remove {user} {name}`") from None
    return users


def add_key(path: Path, user: str, key_text: str, key_name: str | None = None) -> AuthorizedKey:
    """Authorize `key_text` for `user` under `key_name` (default: a UTC timestamp)."""
    problem = username_problem(user) or reserved_problem(user)
    if problem:
        raise AuthError(problem)
    key = parse_public_key(key_text)
    name = key_name or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    users = read_users(path)
    for other in users.get(user, {}).values():
        if other.name == name:
            raise AuthError(f"user {user!r} already has a key named {name!r}; pick another name or remove it "
                            f"first (`pie auth remove {user} {name}`)")
        if openssh_line(other.key) == openssh_line(key):
            raise AuthError(f"user {user!r} already has this key (as {other.name!r})")
    text = " ".join([openssh_line(key), *_comment(key_text)])
    raw = _read_raw(path)
    raw.setdefault("users", {}).setdefault(user, {}).setdefault("keys", {})[name] = text
    _write(path, raw)
    return AuthorizedKey(user, name, key, text)


def remove(path: Path, user: str, key_name: str | None = None) -> list[str]:
    """Remove one key, or the whole user when `key_name` is None; returns the removed key names."""
    raw = _read_raw(path)
    entry = raw.get("users", {}).get(user)
    if entry is None:
        raise AuthError(f"no user {user!r} in {path}; `pie auth list` shows who is there")
    keys = entry.setdefault("keys", {})
    if key_name is None:
        removed = list(keys)
        del raw["users"][user]
    elif key_name in keys:
        removed = [key_name]
        del keys[key_name]
        if not keys:  # a user without keys could never get in; drop it
            del raw["users"][user]
    else:
        raise AuthError(f"user {user!r} has no key named {key_name!r}; its keys: {', '.join(keys) or 'none'}")
    _write(path, raw)
    return removed


def _comment(key_text: str) -> list[str]:
    """The words after `type base64` on an OpenSSH line (PEM keys carry none)."""
    first = key_text.strip().split("\n", 1)[0]
    return [] if first.startswith("-----") else first.split()[2:]


def _read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix it or remove it and add the keys again") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror}); check its owner and permissions") from None
    if set(raw) - {"users"} or not isinstance(raw.get("users", {}), Mapping):
        raise ConfigError(f"{path}: only a [users.<name>.keys] table may be in this file; "
                          f"found {', '.join(sorted(raw))}")
    return raw


def _write(path: Path, raw: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tomli_w.dumps(raw), mode=FILE_MODE)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
