"""The engine contract as bytes: msgpack with two extension types, never pickle.

Carries the plain data of `pie.engine.batch` (ForwardBatch in, BatchResult
out), `EngineConfig` and `EngineInfo` between the server and the engine
worker, and between the worker's ranks. Torch-free.

- A dataclass of the closed set `_TYPES` is ext `_DATACLASS`: [tag, field
  values in declaration order]. Decoding can only ever build these types.
- A tuple is ext `_TUPLE` (msgpack would turn it into a list), so values
  round-trip exactly: `page_copies` pairs, `Probe.tokens`, a distribution's
  (ids, probs).

Messages are lists `[op, *args]`; see `pie.engine.worker` for the ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np

from pie import errors
from pie.engine.batch import BatchResult, ForwardBatch, OutputSpec, Probe, Request, Sampler
from pie.engine.config import EngineConfig
from pie.engine.info import EngineInfo
from pie.errors import PieError, ProtocolError

_TUPLE, _DATACLASS = 1, 2
_TYPES: tuple[type, ...] = (Sampler, Probe, OutputSpec, Request, ForwardBatch, BatchResult, EngineConfig, EngineInfo)
_TAG = {cls: i for i, cls in enumerate(_TYPES)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES}


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "iu":
        return obj.tolist()  # a Request's page ids / tokens held as an array: a list on the wire
    tag = _TAG.get(type(obj))
    if tag is None:
        raise TypeError(f"{type(obj).__name__} cannot cross the engine wire (plain data and the batch "
                        f"contract's dataclasses only)")
    return msgpack.ExtType(_DATACLASS, _pack([tag, *(getattr(obj, f) for f in _FIELDS[type(obj)])]))


def _ext_hook(code: int, data: bytes) -> Any:
    value = _unpack(data)
    if code == _TUPLE:
        return tuple(value)
    if code == _DATACLASS:
        tag, *values = value
        if not 0 <= tag < len(_TYPES):
            raise ProtocolError(f"engine wire: unknown dataclass tag {tag}")
        return _TYPES[tag](*values)
    raise ProtocolError(f"engine wire: unknown extension type {code}")


def _pack(value: Any) -> bytes:
    # strict_types: tuples and dataclasses reach `_default` instead of being packed as lists / refused.
    return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode(message: list[Any]) -> bytes:
    return _pack(message)


def decode(data: bytes) -> list[Any]:
    try:
        message = _unpack(data)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"engine wire: a message is not valid msgpack: {e}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ProtocolError("engine wire: a message must be a non-empty list starting with its op name")
    return message


def error_to_wire(exc: BaseException) -> list[str]:
    """[class name, message]: the server re-raises the same pie error type (`error_from_wire`)."""
    return [type(exc).__name__, str(exc)]


def error_from_wire(name: str, message: str) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, PieError):
        return cls(message)
    return errors.EngineWorkerError(f"{name}: {message}")
