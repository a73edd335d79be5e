"""SSH-key authentication: the keystore `pie auth` writes, key parsing, signature checks, challenges.

The server's side is two calls:

    keys = open_keystore(config.pie_home)   # $PIE_HOME/authorized_users.toml; refuses an empty one
    challenger = Challenger()               # issue() / consume(): single-use 48-byte nonces (the server's
                                            # handshake keeps its own, one per connection)

`keys.has_user(name)` and `keys.verify(name, challenge, signature)` answer the handshake; the client
signs with `sign_challenge(private_key_path, challenge)`.
"""

from __future__ import annotations

from pathlib import Path

from pie.auth.challenge import CHALLENGE_BYTES, Challenger
from pie.auth.keys import (
    PublicKey,
    fingerprint,
    key_type,
    openssh_line,
    parse_public_key,
    sign_challenge,
    verify_signature,
)
from pie.auth.keystore import AuthorizedKey, KeyStore, add_key, keystore_path, read_users, remove
from pie.errors import ConfigError

__all__ = [
    "CHALLENGE_BYTES", "AuthorizedKey", "Challenger", "KeyStore", "PublicKey", "add_key", "fingerprint",
    "key_type", "keystore_path", "open_keystore", "openssh_line", "parse_public_key", "read_users", "remove",
    "sign_challenge", "verify_signature",
]


def open_keystore(home: Path | None = None) -> KeyStore:
    """The keystore a server with `enable_auth` uses; refuses to start with nobody authorized."""
    path = keystore_path(home)
    store = KeyStore(path)
    if not store.users():
        raise ConfigError(f"enable_auth is on but {path} authorizes nobody, so no client could connect; "
                          "add a user with `pie auth add USER < ~/.ssh/id_ed25519.pub`, or serve with --no-auth")
    return store
