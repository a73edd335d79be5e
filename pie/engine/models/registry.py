"""model_type -> model class. Every module in this package registers itself on import.

Adding a family is one new file in `pie/engine/models/` that decorates its
class with `@register("<hf model_type>", ...)`; nothing else changes.

Families that are known but cannot run on this engine are listed in
`_UNSUPPORTED` with the reason, so `pie model list` / `info` can say why
instead of only "unsupported".
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

# Known Hugging Face model types this engine cannot run, and why.
_UNSUPPORTED: dict[str, str] = {}


def register(*model_types: str) -> Callable[[_C], _C]:
    def deco(cls: _C) -> _C:
        for mt in model_types:
            assert mt not in _ARCHITECTURES, f"model_type {mt} registered twice"
            assert mt not in _UNSUPPORTED, f"model_type {mt} is listed as unsupported"
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


def known_unsupported_model_types() -> dict[str, str]:
    """model_type -> why this engine cannot run it (families users ask for that are not implementable here)."""
    return dict(_UNSUPPORTED)


def unsupported_reason(model_type: str) -> str | None:
    """None when `model_type` runs on this engine, else a sentence saying why not."""
    _import_all()
    if model_type in _ARCHITECTURES:
        return None
    if model_type in _UNSUPPORTED:
        return f"model_type {model_type!r} is not supported: {_UNSUPPORTED[model_type]}"
    return (f"model_type {model_type!r} is not supported by this engine (no implementation); supported: "
            f"{', '.join(sorted(_ARCHITECTURES))}")


def get_architecture(model_type: str) -> type[CausalLM]:
    reason = unsupported_reason(model_type)
    if reason is not None:
        raise UnsupportedModelError(reason)
    return _ARCHITECTURES[model_type]
