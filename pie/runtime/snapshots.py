"""Named snapshots of contexts, per user and model, alive until the runtime stops.

A snapshot is a context owned by the store: `save` forks the caller's
context into it (pages shared, nothing copied), `open` forks it back out (the
snapshot stays), `take` hands the snapshot's own context over (the snapshot is
gone), `delete` drops it. Names are scoped per user: two users never see each
other's snapshots. Snapshots have the lowest priority, so under page pressure
they are the first contexts suspended; their committed pages usually stay in
the prefix cache and come back without recomputation.

A snapshot lives where its pages are: on the data-parallel group of the context
it was saved from (a fork is made in its parent's context space), and contexts
opened or taken from it are on that group too.
"""

from __future__ import annotations

import math
import uuid

from inferlet._host import HostError
from pie.runtime.context import Context

SNAPSHOT_OWNER = "snapshot"


class SnapshotStore:
    def __init__(self, model: str) -> None:
        self.model = model
        self._contexts: dict[tuple[str, str], Context] = {}

    def __len__(self) -> int:
        return len(self._contexts)

    def names(self, username: str) -> list[str]:
        return sorted(name for user, name in self._contexts if user == username)

    def save(self, username: str, name: str, ctx: Context) -> None:
        if not name:
            raise HostError("a snapshot needs a non-empty name")
        if (username, name) in self._contexts:
            raise HostError(f"snapshot {name!r} already exists for model {self.model!r}; delete it first, "
                            "take it, or choose another name")
        snap = ctx.fork(SNAPSHOT_OWNER)
        snap.priority = -math.inf
        self._contexts[(username, name)] = snap

    def save_anonymous(self, username: str, ctx: Context) -> str:
        name = f"snapshot-{uuid.uuid4().hex[:12]}"
        self.save(username, name, ctx)
        return name

    def open(self, username: str, name: str, owner: str) -> Context:
        ctx = self._get(username, name).fork(owner)
        ctx.priority = 0.0
        return ctx

    def take(self, username: str, name: str, owner: str) -> Context:
        ctx = self._get(username, name)
        del self._contexts[(username, name)]
        ctx.owner, ctx.priority = owner, 0.0
        return ctx

    def delete(self, username: str, name: str) -> None:
        self._get(username, name).destroy()
        del self._contexts[(username, name)]

    def clear(self) -> None:
        for ctx in self._contexts.values():
            ctx.destroy()
        self._contexts.clear()

    def _get(self, username: str, name: str) -> Context:
        ctx = self._contexts.get((username, name))
        if ctx is None:
            mine = self.names(username)
            raise HostError(f"no snapshot named {name!r} for model {self.model!r}; this user has "
                            f"{', '.join(map(repr, mine[:10])) or 'none'}")
        return ctx
