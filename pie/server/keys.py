"""The server's view of `pie.auth`: the authorized users `pie auth` writes, and single-use challenges.

`load_keys(config)` returns the two objects the handshake (`pie/server/auth.py`)
needs: a `KeyStore` (does the user exist; does a signature verify under any
of the user's keys) and a `Challenger` (fresh 48-byte nonces, each usable
once).
"""

from __future__ import annotations

from typing import Any

from pie.errors import PieError
from pie.server.auth import Challenger, KeyStore


class KeysUnavailableError(PieError):
    """Authentication is on but the keystore cannot be used."""


def load_keys(config: Any) -> tuple[KeyStore, Challenger]:
    try:
        from pie import auth  # noqa: F401 - the keystore and challenge primitives
    except ImportError:
        raise KeysUnavailableError("enable_auth is on but this install has no `pie.auth` (keystore and "
                                   "signature checks); turn auth off (`pie serve --no-auth`) or update pie") from None
    raise KeysUnavailableError("enable_auth: the keystore adapter is not wired to pie.auth yet; run with "
                               "`--no-auth` on a trusted host")
