"""`pie run NAME -- ARGS...`: the words after `--` folded into the inferlet's input dict.

    --max-tokens 64 --temperature 0.7 --greedy --stop a --stop b "a prompt"
    -> {"max_tokens": 64, "temperature": 0.7, "greedy": true, "stop": ["a", "b"], "_positional": ["a prompt"]}

- `--name VALUE`, `--name=VALUE` and `-n VALUE` set a key; dashes in names become underscores.
- Values are tried as int, then float, then bool (true/false), then kept as text.
- A flag followed by another flag (a word starting with `-`, other than a negative number) or by
  nothing is `true`.
- A key given several times collects its values in a list.
- Words that follow no flag are positionals, kept in order and as typed (text) under `_positional`.
"""

from __future__ import annotations

from typing import Any

from pie.config_io import parse_value
from pie.errors import RequestError

POSITIONAL = "_positional"


def fold_args(words: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    positional: list[Any] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not _is_flag(word):
            positional.append(word)
            i += 1
            continue
        key, sep, inline = word.lstrip("-").partition("=")
        if not key:
            raise RequestError(f"argument {word!r} has no name; write --name VALUE")
        key = key.replace("-", "_")
        if sep:
            value: Any = parse_value(inline)
        elif i + 1 < len(words) and not _is_flag(words[i + 1]):
            value = parse_value(words[i + 1])
            i += 1
        else:
            value = True
        _put(out, key, value)
        i += 1
    if positional:
        out[POSITIONAL] = positional
    return out


def _is_flag(word: str) -> bool:
    """`-x`, `--name`: yes; `-`, `-3`, `-0.5`: no (a lone dash and negative numbers are values)."""
    if len(word) < 2 or not word.startswith("-"):
        return False
    return not isinstance(parse_value(word), (int, float))


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if key == POSITIONAL:
        raise RequestError(f"--{POSITIONAL} is reserved for the positional arguments; rename the flag")
    if key not in out:
        out[key] = value
    elif isinstance(out[key], list):
        out[key].append(value)
    else:
        out[key] = [out[key], value]
