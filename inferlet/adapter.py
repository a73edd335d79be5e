"""LoRA adapters, named per user, applied per pass (`fwd.adapter(a)`) or per generation (`adapter=a`)."""

from __future__ import annotations

from inferlet._host import get_host
from inferlet.model import Model


class Adapter:
    __slots__ = ("_handle", "model", "name")

    def __init__(self, model: Model, name: str, handle: int) -> None:
        self.model = model
        self.name = name
        self._handle = handle

    @staticmethod
    def create(model: Model, name: str) -> Adapter:
        return Adapter(model, name, get_host().adapter_create(model.name, name))

    @staticmethod
    def open(model: Model, name: str) -> Adapter | None:
        handle = get_host().adapter_open(model.name, name)
        return None if handle is None else Adapter(model, name, handle)

    def fork(self, new_name: str) -> Adapter:
        return Adapter(self.model, new_name, get_host().adapter_fork(self._handle, new_name))

    def load(self, path: str) -> None:
        get_host().adapter_load(self._handle, path)

    def save(self, path: str) -> None:
        get_host().adapter_save(self._handle, path)

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to free: as in Pie, a named adapter stays resident until the server stops (a `with`
        block only scopes the handle in the inferlet's code)."""

    def __repr__(self) -> str:
        return f"Adapter({self.name!r})"
