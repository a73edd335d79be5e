"""`pie run NAME -- ARGS...`: how the words after `--` become the inferlet's input dict (operator.md)."""

from __future__ import annotations

import pytest

from pie.cli.args import fold_args
from pie.errors import RequestError


@pytest.mark.parametrize(("words", "expected"), [
    (["--max-tokens", "64"], {"max_tokens": 64}),
    (["--temperature", "0.7", "--top-p", "1e-1"], {"temperature": 0.7, "top_p": 0.1}),
    (["--stream", "true", "--echo", "False"], {"stream": True, "echo": False}),
    (["--prompt", "Tell me a story"], {"prompt": "Tell me a story"}),
    (["--greedy"], {"greedy": True}),  # a bare flag at the end
    (["--greedy", "--max-tokens", "8"], {"greedy": True, "max_tokens": 8}),  # a bare flag before another
    (["-k", "v", "-n", "3"], {"k": "v", "n": 3}),
    (["--name=value", "--n=2"], {"name": "value", "n": 2}),
    (["--offset", "-3", "--scale", "-0.5"], {"offset": -3, "scale": -0.5}),  # negative numbers are values
    (["--stop", "a", "--stop", "b", "--stop", "c"], {"stop": ["a", "b", "c"]}),  # repeated: a list
    (["first", "--k", "v", "second", "42"], {"k": "v", "_positional": ["first", "second", "42"]}),
    (["-", "--x", "nan"], {"x": "nan", "_positional": ["-"]}),
    ([], {}),
])
def test_fold_args(words: list[str], expected: dict[str, object]) -> None:
    assert fold_args(words) == expected


def test_int_then_float_then_bool_then_string() -> None:
    folded = fold_args(["--a", "1", "--b", "1.5", "--c", "TRUE", "--d", "1x", "--e", "007"])
    assert folded == {"a": 1, "b": 1.5, "c": True, "d": "1x", "e": 7}
    assert type(folded["a"]) is int and type(folded["b"]) is float


def test_a_value_starting_with_a_dash_is_a_flag() -> None:
    assert fold_args(["--prompt", "--verbose"]) == {"prompt": True, "verbose": True}


@pytest.mark.parametrize("words", [["--", "x"], ["--=3"], ["--_positional", "x"]])
def test_unusable_flags_are_refused(words: list[str]) -> None:
    with pytest.raises(RequestError):
        fold_args(words)
