"""Which isolation mode a server runs inferlets in: `[runtime] isolation`, with `auto` decided here.

`auto` (the default) is `isolated` when authentication is on and the keystore
authorizes more than one user: a trusted inferlet shares the server's
interpreter, so it can reach every user's snapshots, processes and queued
messages, which is acceptable for one user and not for several. Otherwise
`auto` is `trusted`. An explicit `trusted` on a multi-user server is honoured,
with a warning at start.

Users added to the keystore after the start do not change the mode; restart
the server (or set the mode explicitly).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Mode = Literal["trusted", "isolated"]


def effective_isolation(config: Any) -> Mode:
    """The mode for a `pie.config.Config` (or anything shaped like it: `runtime.isolation`,
    `enable_auth`, `pie_home`)."""
    runtime = getattr(config, "runtime", None)
    configured = getattr(runtime, "isolation", "trusted")
    if configured == "isolated":
        return "isolated"
    users = authorized_users(config)
    if configured == "auto":
        return "isolated" if users > 1 else "trusted"
    if users > 1:
        log.warning("[runtime] isolation = \"trusted\" with authentication on and %d users authorized: every "
                    "inferlet runs in the server's interpreter and can reach every user's snapshots, processes "
                    "and messages. Use isolation = \"isolated\" (or \"auto\") unless all users trust each other",
                    users)
    return "trusted"


def authorized_users(config: Any) -> int:
    """How many users may log in: 0 with authentication off (everyone is one anonymous tenant)."""
    if not getattr(config, "enable_auth", False):
        return 0
    from pie.auth import keystore_path, read_users

    home = getattr(config, "pie_home", None)
    return len(read_users(keystore_path(Path(home) if home is not None else None)))
