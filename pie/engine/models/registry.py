"""model_type -> model class. Every module in this package registers itself on import.

Adding a family is one new file in `pie/engine/models/` that decorates its
class with `@register("<hf model_type>", ...)`; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pie.errors import UnsupportedModelError

if TYPE_CHECKING:
    from pie.engine.models.decoder import CausalLM

_C = TypeVar("_C", bound="type[CausalLM]")
_ARCHITECTURES: dict[str, type[CausalLM]] = {}
_NOT_MODEL_MODULES = {"registry", "decoder"}


def register(*model_types: str) -> Callable[[_C], _C]:
    def deco(cls: _C) -> _C:
        for mt in model_types:
            assert mt not in _ARCHITECTURES, f"model_type {mt} registered twice"
            _ARCHITECTURES[mt] = cls
        return cls

    return deco


def _import_all() -> None:
    import pie.engine.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_MODEL_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def supported_model_types() -> list[str]:
    _import_all()
    return sorted(_ARCHITECTURES)


def get_architecture(model_type: str) -> type[CausalLM]:
    _import_all()
    if model_type not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by this engine; supported: "
            f"{', '.join(sorted(_ARCHITECTURES))}"
        )
    return _ARCHITECTURES[model_type]
