"""JSON from clients, parsed with limits: every server path that decodes client JSON goes through here.

`loads_limited(data)` is `json.loads` plus the checks a network service needs, each an `InputError`
(a 400 over HTTP, a refused request over the WebSocket) instead of an internal error:

- nesting deeper than `max_depth` (Python's decoder recurses, so 100,000 brackets would raise
  `RecursionError` from inside the parser);
- `NaN`, `Infinity`, `-Infinity` and numbers that overflow to infinity (`1e999`), which poison
  temperatures and priorities;
- lone UTF-16 surrogates (`"\\ud800"`): valid JSON escapes that make a `str` no UTF-8 encoder,
  tokenizer or response writer can handle;
- bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pie.errors import InputError

MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads_limited(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """Parse client JSON; raise `InputError` naming the problem (and where) instead of anything else."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"the JSON is not UTF-8 (byte {error.start}: {error.reason}); send UTF-8 text") from None
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON: {error}") from None
    except ValueError as error:  # an integer of more than sys.get_int_max_str_digits() digits
        raise InputError(f"not usable JSON: {error}") from None
    except RecursionError:
        raise InputError(f"the JSON is nested too deep; at most {max_depth} levels of arrays and objects "
                         "are accepted") from None
    check_value(value, max_depth)
    return value


def check_value(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Depth and string checks on decoded data (iterative: no recursion however deep `value` is)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "$")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise InputError(f"the JSON is nested deeper than {max_depth} levels (at {path}); flatten it")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(str(key), f"{path} key")
                    stack.append((child, depth + 1, f"{path}.{_short(str(key))}"))
            else:
                stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))


def _check_text(text: str, path: str) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        raise InputError(f"the string at {path} holds a lone surrogate (U+{ord(found.group()):04X} at "
                         f"character {found.start()}); send valid Unicode (encode astral characters as one "
                         "code point or as a valid surrogate pair)")


def _refuse_constant(name: str) -> Any:
    raise InputError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"the number {_short(text)} is out of range (it would be infinite); send a finite number")
    return value


def _short(key: str) -> str:
    return key if len(key) <= 32 else key[:29] + "..."
