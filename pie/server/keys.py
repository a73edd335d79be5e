"""The server's view of `pie.auth`: the authorized users `pie auth` writes.

`load_keys(config)` returns the `KeyStore` the handshake (`pie/server/auth.py`)
needs: does the user exist; does a signature verify under any of the user's
keys. Challenges are the handshake's own (one per connection).
"""

from __future__ import annotations

from typing import Any

from pie.errors import PieError
from pie.server.auth import KeyStore


class KeysUnavailableError(PieError):
    """Authentication is on but the keystore cannot be used."""


def load_keys(config: Any) -> KeyStore:
    try:
        from pie import auth  # the keystore and signature primitives
    except ImportError:
        raise KeysUnavailableError("enable_auth is on but this install has no `pie.auth` (keystore and "
                                   "signature checks); turn auth off (`pie serve --no-auth`) or update pie") from None
    # $PIE_HOME/authorized_users.toml, the file `pie auth` writes; refuses one that authorizes nobody.
    return auth.open_keystore(getattr(config, "pie_home", None))
