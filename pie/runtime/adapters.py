"""Named LoRA adapters of one model, scoped per user, resident on every engine of the model.

    store = AdapterStore([engine], root=Path("~/.pie/adapters"))
    a = store.create("alice", "math")
    store.load(a, "math-v1")        # ~/.pie/adapters/alice/math-v1, else ~/.pie/adapters/math-v1
    slot = store.slot_of(a)          # what a forward pass puts in `Request.adapter`

An adapter is a name until weights are loaded into it; loading gives it an
engine slot (the engine picks the lowest free one, within max_num_adapters).
With data parallelism the model has one engine per group and a context may be
on any of them, so every operation is applied to each engine in the same
order: the slots stay identical everywhere. Adapters persist until the server
stops (the inferlet API's rule), so names survive the instance that made them.

Paths an inferlet passes are relative to the adapter folder (`adapter_path`,
default `$PIE_HOME/adapters`): loads look in the user's own subfolder first,
then the shared folder the operator fills; saves go to the user's subfolder.
Absolute paths and `..` are refused, so an inferlet reaches no other files.

Zeroth-order training (`inferlet.zo`): `zo_initialize` gives an adapter an evolution-strategy state on
every engine (a fresh adapter when it has no weights yet), `zo_update` takes one ES step on every engine;
a pass then names the adapter and a seed (`Request.zo_seed`). See `pie.engine.zo` for the math.

The engine calls are synchronous: an adapter load is rare and short, and an
inferlet's `Adapter.load` is a plain call in the API, so it blocks the event
loop for the load (and for a batch in flight on that engine) rather than
returning before the weights are there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

from pie.errors import AdapterError

_SAFE_OWNER = re.compile(r"^[A-Za-z0-9_.@+-]+$")


@runtime_checkable
class AdapterEngine(Protocol):
    """The adapter calls of an engine client (`InProcessEngine`); each returns once the engine has done it."""

    def load_adapter(self, path: str, slot: int | None) -> int: ...
    def fork_adapter(self, slot: int, new_slot: int | None) -> int: ...
    def save_adapter(self, slot: int, path: str) -> None: ...
    def unload_adapter(self, slot: int) -> None: ...
    def zo_initialize(self, slot: int | None, rank: int, alpha: float, population_size: int, mu_fraction: float,
                      initial_sigma: float) -> int: ...
    def zo_update(self, slot: int, scores: list[float], seeds: list[int], max_sigma: float) -> None: ...


@dataclass(eq=False)
class NamedAdapter:
    owner: str
    name: str
    slot: int | None = None  # engine slot once weights are loaded
    source: str = ""  # the folder its weights came from (or "fork of NAME")
    zo: bool = False  # has an evolution-strategy state: passes may perturb it by a zo seed


class AdapterStore:
    def __init__(self, engines: Sequence[object], root: Path, model: str = "") -> None:
        self._engines = list(engines)
        self.root = Path(root)
        self.model = model
        self._named: dict[tuple[str, str], NamedAdapter] = {}

    # -- names ----------------------------------------------------------------------------------

    def create(self, owner: str, name: str) -> NamedAdapter:
        key = (owner, _check_name(name))
        if key in self._named:
            raise AdapterError(f"adapter {name!r} already exists for user {owner!r}; Adapter.open it, or pick "
                               "another name")
        adapter = self._named[key] = NamedAdapter(owner, name)
        return adapter

    def open(self, owner: str, name: str) -> NamedAdapter | None:
        return self._named.get((owner, name))

    def fork(self, adapter: NamedAdapter, new_name: str) -> NamedAdapter:
        """A new adapter under `new_name` with a copy of `adapter`'s weights (independent from then on)."""
        new = self.create(adapter.owner, new_name)
        src = adapter.slot
        if src is not None:
            try:
                new.slot = self._on_engines(lambda e, slot: e.fork_adapter(src, slot))
            except AdapterError:
                del self._named[(new.owner, new.name)]
                raise
            new.source = f"fork of {adapter.name}"
            new.zo = adapter.zo  # the engines fork the ES state with the weights
        return new

    # -- weights --------------------------------------------------------------------------------

    def load(self, adapter: NamedAdapter, path: str) -> None:
        """Load the PEFT folder `path` into `adapter` (replacing its weights); AdapterError says what is wrong."""
        folder = self._find(adapter.owner, path)
        adapter.slot = self._on_engines(lambda e, slot: e.load_adapter(str(folder), slot), adapter.slot)
        adapter.source = str(folder)
        adapter.zo = False  # new weights, no evolution state: zo.initialize again to evolve them

    def save(self, adapter: NamedAdapter, path: str) -> Path:
        """Write `adapter` as a PEFT folder under the owner's adapter folder; returns where."""
        slot = self.slot_of(adapter)
        target = self._user_dir(adapter.owner) / _relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._adapter_engine(self._engines[0]).save_adapter(slot, str(target))
        return target

    def zo_initialize(self, adapter: NamedAdapter, rank: int, alpha: float, population_size: int,
                      mu_fraction: float, initial_sigma: float) -> None:
        """Start zeroth-order training of `adapter` (a fresh rank-`rank` adapter if it has no weights yet)."""
        adapter.slot = self._on_engines(lambda e, slot: e.zo_initialize(slot, rank, alpha, population_size,
                                                                        mu_fraction, initial_sigma), adapter.slot)
        adapter.source = adapter.source or f"zo.initialize(rank={rank}, alpha={alpha:g})"
        adapter.zo = True

    def zo_update(self, adapter: NamedAdapter, scores: list[float], seeds: list[int], max_sigma: float) -> None:
        """One evolution-strategy step of `adapter` from the scores of its perturbed passes, on every engine."""
        slot = self.zo_slot_of(adapter)
        for engine in self._engines:
            self._adapter_engine(engine).zo_update(slot, scores, seeds, max_sigma)

    def zo_slot_of(self, adapter: NamedAdapter) -> int:
        """The slot of an adapter a zo seed may perturb."""
        if not adapter.zo:
            raise AdapterError(f"adapter {adapter.name!r} has no zeroth-order state; call zo.initialize(adapter, "
                               "rank, alpha, population_size, mu_fraction, initial_sigma) first")
        return self.slot_of(adapter)

    def slot_of(self, adapter: NamedAdapter) -> int:
        if adapter.slot is None:
            raise AdapterError(f"adapter {adapter.name!r} has no weights yet; load() a PEFT folder into it first")
        return adapter.slot

    def names(self, owner: str) -> list[str]:
        return sorted(name for o, name in self._named if o == owner)

    # -- helpers --------------------------------------------------------------------------------

    def _on_engines(self, op: Callable[[AdapterEngine, int | None], int], slot: int | None = None) -> int:
        """Run op(engine, slot) on the first engine (which picks the slot if None), then on the others."""
        first, *rest = [self._adapter_engine(e) for e in self._engines]
        slot = op(first, slot)
        for engine in rest:
            op(engine, slot)
        return int(slot)

    def _adapter_engine(self, engine: object) -> AdapterEngine:
        if not isinstance(engine, AdapterEngine):
            raise AdapterError(f"model {self.model!r} runs on an engine without LoRA support "
                               f"({type(engine).__name__}, e.g. tensor_parallel_size > 1); serve it with "
                               "tensor_parallel_size = 1 to use adapters")
        return engine

    def _user_dir(self, owner: str) -> Path:
        if not _SAFE_OWNER.match(owner) or owner in (".", ".."):
            raise AdapterError(f"user name {owner!r} cannot name an adapter folder")
        return self.root / owner

    def _find(self, owner: str, path: str) -> Path:
        rel = _relative(path)
        places = (self._user_dir(owner) / rel, self.root / rel)
        for place in places:
            if place.is_dir():
                return place
        raise AdapterError(f"no adapter folder {path!r}: looked in {places[0]} and {places[1]}; put a PEFT "
                           "adapter there (adapter_config.json + adapter_model.safetensors)")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
    return name


def _relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(str(path))
    if not str(path) or rel.is_absolute() or ".." in rel.parts:
        raise AdapterError(f"adapter path {path!r} must be relative to the adapter folder (no leading / and no "
                           "'..'); inferlets reach adapters only there")
    return rel
