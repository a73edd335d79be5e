"""Constrained decoding: grammars compiled by llguidance against the model's own tokenizer.

A *constraint* is any object with `step(accepted: list[int]) -> list[int]`:
given the tokens accepted since its last call, it returns the BRLE logit
mask for the next token (`[]` = no restriction). A *schema* builds one:

    ctx.generate(Sampler.argmax(), constrain=JsonSchema(schema))   # or Regex, Ebnf, AnyJson

`Grammar` + `Matcher` give the same machinery by hand. JSON grammars use
compact whitespace unless the schema sets llguidance's `x-guidance` options
itself: with flexible whitespace a model can pad forever. EBNF is Lark
syntax (llguidance's dialect).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from inferlet import brle, chat
from inferlet._instance import instance_state
from inferlet.model import Model, Tokenizer

_COMPACT_JSON = {"whitespace_flexible": False}


@runtime_checkable
class Constraint(Protocol):
    def step(self, accepted: list[int]) -> list[int]: ...


@runtime_checkable
class Schema(Protocol):
    def build_constraint(self, model: Model) -> Constraint: ...


class GrammarError(ValueError):
    """A grammar does not compile, or generated tokens left it."""


class Grammar:
    """A grammar in llguidance's serialized form (compiled lazily, against a tokenizer, by `Matcher`)."""

    def __init__(self, source: str) -> None:
        message = llguidance.LLMatcher.validate_grammar(source)  # "" when valid
        if message:
            raise GrammarError(f"grammar does not compile: {message.strip()}")
        self._source = source

    @staticmethod
    def from_json_schema(schema: str | dict[str, Any]) -> Grammar:
        value = json.loads(schema) if isinstance(schema, str) else dict(schema)
        if not isinstance(value, dict):
            raise GrammarError(f"a JSON schema is an object, got {type(value).__name__}")
        value.setdefault("x-guidance", _COMPACT_JSON)
        return Grammar(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(value)))

    @staticmethod
    def json() -> Grammar:
        """Any JSON value."""
        return Grammar.from_json_schema({})

    @staticmethod
    def from_regex(pattern: str) -> Grammar:
        return Grammar(llguidance.LLMatcher.grammar_from_regex(pattern))

    @staticmethod
    def from_ebnf(ebnf: str) -> Grammar:
        """A Lark grammar (start rule `start`)."""
        return Grammar(llguidance.LLMatcher.grammar_from_lark(ebnf))

    def to_string(self) -> str:
        return self._source


def grammar_tokenizer(model: Model) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary, built once per model (shared when the runtime allows)."""
    cache = instance_state().grammar_tokenizers
    tok = cache.get(model.name)
    if tok is None:
        tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_VocabView(model)),
                                     n_vocab=len(chat.vocab_bytes(model)), eos_token=chat.stop_tokens(model))
        cache[model.name] = tok
    return tok


class _VocabView:
    """The shape `llguidance.TokenizerWrapper` reads: token bytes, EOS, specials, and an encoder."""

    def __init__(self, model: Model) -> None:
        stops = chat.stop_tokens(model)
        self.eos_token_id = stops[0] if stops else 0
        self.bos_token_id = None
        self.tokens = chat.vocab_bytes(model)
        self.special_token_ids = sorted(chat.special_ids(model))
        self._tokenizer = Tokenizer(model)

    def __call__(self, text: bytes | str) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class Matcher:
    """A grammar's state over one generation: accept tokens, ask for the next mask."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer | Model) -> None:
        self._model = tokenizer if isinstance(tokenizer, Model) else tokenizer._model
        self._tok = grammar_tokenizer(self._model)
        self._vocab_size = min(self._tok.vocab_size, self._model.vocab_size)
        self._m = llguidance.LLMatcher(self._tok, grammar.to_string())
        if self._m.is_error():
            raise GrammarError(f"grammar does not compile for this tokenizer: {self._m.get_error()}")
        self._bitmask = allocate_token_bitmask(1, self._tok.vocab_size)

    def accept_tokens(self, token_ids: list[int]) -> None:
        if token_ids and not self._m.consume_tokens(list(token_ids)):
            raise GrammarError(f"tokens {list(token_ids)} leave the grammar: {self._m.get_error()}")

    def next_token_logit_mask(self) -> list[int]:
        """BRLE over the vocabulary; after the grammar completes only end-of-sequence tokens are allowed."""
        fill_next_token_bitmask(self._m, self._bitmask)
        mask = brle.from_bitmask(self._bitmask[0], self._vocab_size)
        if len(mask) <= 1:  # nothing allowed: the engine would refuse the pass
            raise GrammarError(f"the grammar allows no next token: {self._m.get_error() or 'dead end'}")
        return mask

    def allowed(self) -> np.ndarray:
        return brle.decode(self.next_token_logit_mask(), self._vocab_size)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (a property, as in Pie)."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        return bool(self._m.is_accepting())

    def reset(self) -> None:
        self._m.reset()


class GrammarConstraint:
    """A Matcher as a Constraint."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher

    def step(self, accepted: list[int]) -> list[int]:
        self.matcher.accept_tokens(accepted)
        return self.matcher.next_token_logit_mask()

    @classmethod
    def from_grammar(cls, grammar: Grammar, model: Model) -> GrammarConstraint:
        return cls(Matcher(grammar, model))

    @classmethod
    def from_json_schema(cls, schema: str | dict[str, Any], model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_json_schema(schema), model)

    @classmethod
    def json(cls, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.json(), model)

    @classmethod
    def from_regex(cls, pattern: str, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_regex(pattern), model)

    @classmethod
    def from_ebnf(cls, ebnf: str, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_ebnf(ebnf), model)


@dataclass(frozen=True)
class AnyJson:
    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.json(model)


@dataclass(frozen=True)
class JsonSchema:
    schema: str | dict[str, Any]

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_json_schema(self.schema, model)


@dataclass(frozen=True)
class Regex:
    pattern: str

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_regex(self.pattern, model)


@dataclass(frozen=True)
class Ebnf:
    source: str

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_ebnf(self.source, model)


class StaticMask:
    """A fixed logit mask as a Constraint (the `logit_mask=` argument of `generate`)."""

    def __init__(self, mask: list[int]) -> None:
        self._mask = list(mask)

    def step(self, accepted: list[int]) -> list[int]:
        return self._mask
