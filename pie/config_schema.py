"""Typed reading of TOML tables into frozen dataclasses, with errors that name the file, the key and the fix.

A dataclass field's type (bool, int, float, str, Path, tuple[str, ...], X | None) is the type its TOML key
must have; its metadata (made with `option(...)`) adds the range checks and a one-line description.
`Reader` walks one file: every error it raises reads

    <file>: <dotted key> = <value> <what is wrong>; <what to do>

and it collects notes (accepted but ignored keys, limits of this engine) for `pie config validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie.errors import ConfigError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           above: float | None = None, choices: Iterable[str] | None = None, model_only: bool = False) -> Any:
    """A dataclass field with the checks its TOML value must pass.

    min/max: inclusive bounds; above: exclusive lower bound; choices: the allowed strings;
    model_only: a per-model key that may not appear at the top level as a default for all models.
    """
    meta = {"help": help, "min": min, "max": max, "above": above,
            "choices": tuple(choices) if choices is not None else None, "model_only": model_only}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default for list-valued options")
    return field(default=default, metadata=meta)


def field_names(cls: type, *, include_model_only: bool = True) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)
                 if include_model_only or not f.metadata.get("model_only", False))


@dataclass
class Reader:
    """Reads one configuration source; `file` names it in every error."""

    file: str
    notes: list[str] = field(default_factory=list)

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key} {problem}; {fix}")

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, f"is {_a(_toml_type(value))}, not a table",
                             f"write it as a table, e.g. [{key.split('[')[0]}] with keys below it")
        return value

    def check_keys(self, table: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
        """Refuse keys outside `allowed`, suggesting the closest allowed one."""
        allowed = list(allowed)
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(sorted(allowed))}"
            raise self.error(join(prefix, key), "is not a known key", f"{hint} (see docs/configuration.md)")

    def values(self, cls: type, table: Mapping[str, Any], prefix: str,
               only: Iterable[str] | None = None) -> dict[str, Any]:
        """Type-check and range-check the keys of `table` that are fields of `cls` (all, or `only`)."""
        hints = field_types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        wanted = set(fields if only is None else only)
        out: dict[str, Any] = {}
        for key, raw in table.items():
            if key in wanted and key in hints:
                out[key] = self.value(raw, hints[key], fields[key], join(prefix, key))
        return out

    def value(self, raw: Any, hint: Any, spec: dataclasses.Field[Any], key: str) -> Any:
        meta = spec.metadata
        default = spec.default if spec.default is not dataclasses.MISSING else None
        example = repr(default).lower() if isinstance(default, bool) else None
        if isinstance(default, (int, float, str)) and default != "" and example is None:
            example = f'"{default}"' if isinstance(default, str) else repr(default)
        value = self.coerce(raw, hint, key, example)
        fix = f"the default is {default!r}" if default not in (None, "", ()) else meta.get("help", "see the docs")
        if meta.get("choices") and value not in meta["choices"]:
            raise self.error(key, f"= {value!r} is not one of {', '.join(map(repr, meta['choices']))}",
                             f"pick one of those ({fix})")
        if meta.get("min") is not None and value < meta["min"]:
            raise self.error(key, f"= {value!r} is below the minimum {meta['min']}", f"use {meta['min']} or more ({fix})")
        if meta.get("max") is not None and value > meta["max"]:
            raise self.error(key, f"= {value!r} is above the maximum {meta['max']}", f"use {meta['max']} or less ({fix})")
        if meta.get("above") is not None and value <= meta["above"]:
            raise self.error(key, f"= {value!r} must be greater than {meta['above']}", f"use a larger value ({fix})")
        return value

    def coerce(self, raw: Any, hint: Any, key: str, example: str | None = None) -> Any:
        """`raw` as type `hint`; ints are accepted where floats are expected, nothing else is converted."""
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            assert len(inner) == 1, f"only X | None unions are supported, got {hint}"
            return self.coerce(raw, inner[0], key)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if not isinstance(raw, list):  # one value where a list is expected: a list of one
                if isinstance(raw, Mapping):
                    raise self.error(key, "is a table, not a list",
                                     f"write a list, e.g. {key.rsplit('.', 1)[-1]} = [{_example(item)}]")
                raw = [raw]
            return tuple(self.coerce(v, item, f"{key}[{i}]") for i, v in enumerate(raw))
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if hint is Path and isinstance(raw, str):
            return Path(raw).expanduser()
        expected = str if hint is Path else hint
        if not isinstance(raw, expected) or (expected is int and isinstance(raw, bool)):
            name = _toml_name(hint)
            raise self.error(key, f"= {raw!r} is {_a(_toml_type(raw))}, not {_a(name)}",
                             f"write {_a(name)}, e.g. {key.rsplit('.', 1)[-1]} = {example or _example(hint)}")
        return raw

    def build(self, cls: type, values: Mapping[str, Any], prefix: str) -> Any:
        """`cls(**values)`; a ConfigError from its own checks is re-raised naming the file and table."""
        try:
            return cls(**values)
        except ConfigError as error:
            where = "" if str(error).startswith("[") else f"[{prefix}] "  # some messages name their table
            raise ConfigError(f"{self.file}: {where}{error}") from None


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field whose annotation names a type importable at run time (fields
    typed with TYPE_CHECKING-only imports are not TOML values and are left out)."""
    namespace = vars(sys.modules[cls.__module__])
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        try:
            out[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # as typing does
        except NameError:
            continue
    return out


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _toml_name(hint: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "table"
    names = {int: "integer", float: "number", str: "string", list: "list"}
    return next((name for t, name in names.items() if isinstance(value, t)), type(value).__name__)


def _example(hint: Any) -> str:
    examples = {bool: "true", int: "1", float: "1.0", str: '"text"', Path: '"/some/path"'}
    return examples.get(hint, '"..."')
