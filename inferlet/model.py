"""Models and their tokenizers, as the runtime serves them.

`Model.load(name)` does not load weights: it names one of the models the
server runs (`runtime.models()`) and fetches the facts the SDK needs (page
size, vocabulary size, stop tokens), once per instance.
"""

from __future__ import annotations

from typing import Any

from inferlet._host import HostError, get_host
from inferlet._instance import instance_state


class Model:
    __slots__ = ("_info", "name")

    def __init__(self, name: str, info: dict[str, Any]) -> None:
        self.name = name
        self._info = info

    @staticmethod
    def load(name: str = "") -> Model:
        """A served model by name; "" is the server's default model."""
        cache = instance_state().model_info
        info = cache.get(name)
        if info is None:
            host = get_host()
            available = host.models()
            if name and name not in available:
                raise HostError(f"no model {name!r} on this server; it serves {available}. "
                                "Use one of those names (or \"\" for the default)")
            info = host.model_info(name)
            cache[name] = info
        return Model(str(info.get("name", name)), info)

    @property
    def info(self) -> dict[str, Any]:
        """Everything the runtime reports about the model (name, page_size, vocab_size, ...)."""
        return dict(self._info)

    @property
    def page_size(self) -> int:
        return int(self._info["page_size"])

    @property
    def vocab_size(self) -> int:
        return int(self._info["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self)

    def default_system_speculation(self) -> bool:
        """Whether argmax generation drafts with the runtime's n-gram speculator by default."""
        return bool(self._info.get("system_speculation", False))

    def run_ahead(self) -> bool:
        """Whether the runtime runs token loops ahead by itself (run-ahead streams); off for hybrid models."""
        return bool(self._info.get("run_ahead", True))

    def eos_tokens(self) -> list[int]:
        return list(self._info.get("stop_tokens") or get_host().stop_tokens(self.name))

    def __repr__(self) -> str:
        return f"Model({self.name!r})"


class Tokenizer:
    __slots__ = ("_model",)

    def __init__(self, model: Model) -> None:
        self._model = model

    def encode(self, text: str) -> list[int]:
        return get_host().tokenize(self._model.name, text)

    def decode(self, tokens: list[int]) -> str:
        return get_host().detokenize(self._model.name, list(tokens))

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        """(ids, bytes of each token)."""
        ids, pieces = get_host().vocabs(self._model.name)
        return list(ids), [bytes(p) for p in pieces]

    def split_regex(self) -> str:
        return str(self._model._info.get("split_regex", ""))

    def special_tokens(self) -> tuple[list[int], list[bytes]]:
        ids, pieces = get_host().special_tokens(self._model.name)
        return list(ids), [bytes(p) for p in pieces]
