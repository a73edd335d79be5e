"""An inferlet's input checked against the `[parameters]` of its Pie.toml, before anything loads.

    [parameters]
    prompt = { type = "string", description = "the user message" }
    max_tokens = { type = "int", optional = true, description = "..." }

`pie run` checks the dict that `pie.cli.args.fold_args` made: every key must be a declared parameter
(a typo gets "did you mean"), each value of the declared type (`string`, `int`, `float`, `bool`;
other type names are not checked), and the parameters not marked `optional` present unless words
without a flag were given (the inferlet reads those from `_positional` itself). An inferlet that
declares no parameters takes any input.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from packaging.version import InvalidVersion, Version

from pie.cli.args import POSITIONAL
from pie.errors import RequestError
from pie.runtime.programs import Manifest

_CHECKED = ("string", "int", "float", "bool")


def flag(name: str) -> str:
    """The command-line spelling of a parameter: max_tokens -> --max-tokens."""
    return "--" + name.replace("_", "-")


def describe(name: str, spec: Mapping[str, Any]) -> str:
    """`--max-tokens (int, optional): tokens to generate at most`."""
    kind = str(spec.get("type", "any"))
    optional = ", optional" if spec.get("optional") else ""
    description = f": {spec['description']}" if spec.get("description") else ""
    return f"{flag(name)} ({kind}{optional}){description}"


def check_input(manifest: Manifest, input: Mapping[str, Any]) -> dict[str, Any]:
    """`input` with every value of its parameter's type (a number given to a `string` parameter becomes
    its text, an int given to a `float` one a float); raises RequestError with the parameters listed."""
    params = {name: spec if isinstance(spec, Mapping) else {} for name, spec in manifest.parameters.items()}
    if not params:
        return dict(input)
    out: dict[str, Any] = {}
    for key, value in input.items():
        if key == POSITIONAL:
            out[key] = value
            continue
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.6)
            hint = f" (did you mean {flag(close[0])}?)" if close else ""
            raise RequestError(f"{manifest.spec} has no parameter {flag(key)}{hint}; {_listing(manifest, params)}")
        out[key] = _typed(manifest, key, str(params[key].get("type", "")), value, params)
    missing = [n for n, spec in params.items() if not spec.get("optional") and n not in out]
    if missing and POSITIONAL not in out:
        needed = ", ".join(flag(n) for n in missing)
        raise RequestError(f"{manifest.spec} needs {needed}; {_listing(manifest, params)}")
    return out


def _typed(manifest: Manifest, key: str, kind: str, value: Any, params: Mapping[str, Mapping[str, Any]]) -> Any:
    if kind not in _CHECKED:
        return value
    if isinstance(value, list):
        if kind == "string":  # several values of a text parameter: a list of strings (openai-compat's stop)
            return [_typed(manifest, key, kind, v, params) for v in value]
        raise RequestError(f"{flag(key)} was given {len(value)} times ({value}); {manifest.spec} takes one "
                           f"{kind}; {_listing(manifest, params)}")
    if kind == "string":
        if isinstance(value, bool):  # a flag with no value: `--prompt` followed by another flag
            raise RequestError(f"{flag(key)} needs a value: {flag(key)} TEXT; {_listing(manifest, params)}")
        return value if isinstance(value, str) else str(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise RequestError(f"{flag(key)} takes {'an' if kind == 'int' else 'a'} {kind}, got {value!r}; "
                       f"{_listing(manifest, params)}")


def _listing(manifest: Manifest, params: Mapping[str, Mapping[str, Any]]) -> str:
    return f"the parameters of {manifest.spec} are " + "; ".join(describe(n, s) for n, s in params.items())


def check_served_input(programs: Sequence[Mapping[str, Any]], spec: str, input: dict[str, Any]) -> dict[str, Any]:
    """`check_input` against what a running server lists (its `programs` query): the same check for
    `pie run --server`, where nothing loads but a mistyped argument would be ignored. A name the
    server does not list is left to the server to refuse."""
    name, _, version = spec.partition("@")
    versions = [p for p in programs if p.get("name") == name and (not version or p.get("version") == version)]
    if not versions:
        return input
    chosen = max(versions, key=lambda p: _version_order(str(p.get("version", ""))))
    manifest = Manifest(name=name, version=str(chosen.get("version", "")),
                        description=str(chosen.get("description", "")), parameters=dict(chosen.get("parameters") or {}))
    return check_input(manifest, input)


def _version_order(version: str) -> tuple[int, Version | None, str]:
    """As the registry orders versions: valid ones by semver, above any invalid one."""
    try:
        return (1, Version(version), "")
    except InvalidVersion:
        return (0, None, version)
