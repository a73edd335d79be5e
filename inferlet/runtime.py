"""Facts about the running instance and the server."""

from __future__ import annotations

from inferlet._host import get_host


def version() -> str:
    """The pie runtime's version."""
    return get_host().version()


def instance_id() -> str:
    """This inferlet instance's id (the process id clients see)."""
    return get_host().instance_id()


def username() -> str:
    """The user who launched this instance."""
    return get_host().username()


def models() -> list[str]:
    """Names of the models this server runs (for `Model.load`)."""
    return list(get_host().models())
