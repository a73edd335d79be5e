"""Per-instance SDK state: the return value set with `set_return`, and caches of model facts.

The runner installs one `InstanceState` per inferlet run together with its
host (`use_instance`). State lives in a context variable holding a mutable
object, so a value set inside a task the inferlet spawned (`asyncio.gather`)
is seen by the runner too. Code that only installs a host (`use_host`) still
works: it gets a fresh, uncached state per call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from inferlet._host import Host, use_host

UNSET: Any = object()


@dataclass
class InstanceState:
    return_value: Any = UNSET
    model_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per model: fixed chat token lists (cue, seal, begin, stop) and the vocabulary's bytes.
    chat_tokens: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    vocab_bytes: dict[str, list[bytes]] = field(default_factory=dict)
    special_ids: dict[str, frozenset[int]] = field(default_factory=dict)
    # Grammar tokenizers keyed by model name; the runtime may pass one dict shared by all instances.
    grammar_tokenizers: dict[str, Any] = field(default_factory=dict)


_state: contextvars.ContextVar[InstanceState] = contextvars.ContextVar("inferlet_state")


@contextmanager
def use_instance(host: Host, state: InstanceState | None = None) -> Iterator[InstanceState]:
    """Install `host` and a per-run state for the current task (and tasks it spawns)."""
    current = state or InstanceState()
    with use_host(host):
        token = _state.set(current)
        try:
            yield current
        finally:
            _state.reset(token)


def instance_state() -> InstanceState:
    try:
        return _state.get()
    except LookupError:
        return InstanceState()


def set_return(value: Any) -> None:
    """Set the inferlet's result, used when `main` returns None (spec 1.1)."""
    instance_state().return_value = value


def get_return_value() -> Any:
    """The value given to `set_return`, or None."""
    value = instance_state().return_value
    return None if value is UNSET else value
