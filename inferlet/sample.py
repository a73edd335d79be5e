"""Samplers (pick a token at an output row) and probes (read a value off it).

`Sampler.argmax()` is exact greedy decoding. Temperature 0 collapses any
sampler to argmax. Logprob, logprobs and entropy are computed without
temperature; a logit mask restricts samplers only, never probes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Sampler:
    """`k` is top-k (0 = off); `p` is the nucleus mass for top_p / top_k_top_p and the floor for min_p.

    Penalties (OpenAI's and vLLM's definitions; applied to the logits before the logit mask, temperature
    and filters, greedy included): `logit_bias` adds a bias per token; `repetition_penalty` divides a
    positive logit of a token in `penalty_tokens` by it and multiplies a negative one; `presence_penalty`
    subtracts once per distinct token of `penalty_tokens`, `frequency_penalty` once per occurrence.
    `penalty_tokens` is the history they count, usually the tokens generated so far:

        s = Sampler.top_p(0.7, 0.9).penalized(presence=0.5, frequency=0.2, logit_bias={50256: -100})
        fwd.sample([row], s.with_history(generated))
    """

    kind: str = "argmax"
    temperature: float = 0.0
    k: int = 0
    p: float = 1.0
    draws: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    penalty_tokens: tuple[int, ...] = ()

    def penalized(self, *, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
                  logit_bias: Mapping[int, float] | None = None) -> Sampler:
        """This sampler with penalties (presence/frequency in [-2, 2], repetition > 0, biases in [-100, 100])."""
        bias = tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items()))
        return replace(self, presence_penalty=float(presence), frequency_penalty=float(frequency),
                       repetition_penalty=float(repetition), logit_bias=bias)

    def with_history(self, tokens: Iterable[int]) -> Sampler:
        """This sampler counting `tokens` for its penalties (a no-op copy when it has none)."""
        return replace(self, penalty_tokens=tuple(int(t) for t in tokens)) if self.penalizes else self

    @property
    def penalizes(self) -> bool:
        """Whether the presence, frequency or repetition penalty is on (they need `with_history`)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @staticmethod
    def argmax() -> Sampler:
        return Sampler("argmax", 0.0)

    @staticmethod
    def greedy() -> Sampler:
        return Sampler.argmax()

    @staticmethod
    def top_p(temperature: float = 0.6, p: float = 0.95) -> Sampler:
        return Sampler("top_p", temperature, p=p)

    @staticmethod
    def top_k(temperature: float = 0.6, k: int = 40) -> Sampler:
        return Sampler("top_k", temperature, k=k)

    @staticmethod
    def min_p(temperature: float = 0.6, p: float = 0.1) -> Sampler:
        return Sampler("min_p", temperature, p=p)

    @staticmethod
    def top_k_top_p(temperature: float = 0.6, k: int = 40, p: float = 0.95) -> Sampler:
        return Sampler("top_k_top_p", temperature, k=k, p=p)

    @staticmethod
    def multinomial(temperature: float = 1.0, draws: int = 1) -> Sampler:
        if draws < 1:
            raise ValueError(f"multinomial draws must be >= 1, got {draws}")
        return Sampler("multinomial", temperature, draws=draws)

    @property
    def is_argmax(self) -> bool:
        return self.kind == "argmax" or self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "temperature": self.temperature, "draws": self.draws}
        if self.kind in ("top_k", "top_k_top_p"):
            out["top_k"] = self.k
        if self.kind in ("top_p", "top_k_top_p"):
            out["top_p"] = self.p
        if self.kind == "min_p":
            out["min_p"] = self.p
        if self.penalizes:
            out |= {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                    "repetition_penalty": self.repetition_penalty, "penalty_tokens": list(self.penalty_tokens)}
        if self.logit_bias:
            out["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        return out


@dataclass(frozen=True, slots=True)
class Logits:
    """The raw float32 logits row (little-endian bytes, vocab_size * 4)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "logits"}


@dataclass(frozen=True, slots=True)
class Distribution:
    """Top-k (ids, probs) of softmax(logits / temperature); k = 0 means as many as the server allows."""

    temperature: float = 1.0
    k: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "distribution", "temperature": self.temperature, "k": self.k}


@dataclass(frozen=True, slots=True)
class Logprob:
    token: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "logprobs", "tokens": [self.token]}


@dataclass(frozen=True, slots=True)
class Logprobs:
    tokens: tuple[int, ...]

    def __init__(self, tokens: list[int] | tuple[int, ...] = ()) -> None:
        object.__setattr__(self, "tokens", tuple(tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "logprobs", "tokens": list(self.tokens)}


@dataclass(frozen=True, slots=True)
class Entropy:
    """Entropy of softmax(logits), in nats."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "entropy"}


@dataclass(frozen=True, slots=True)
class Embedding:
    """The final hidden state at the row (float32 bytes)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "embedding"}


Probe = Logits | Distribution | Logprob | Logprobs | Entropy | Embedding
PROBE_TYPES = (Logits, Distribution, Logprob, Logprobs, Entropy, Embedding)


def probe_kind(probe: Any) -> str:
    """The accessor family of a probe: which `Output` method reads it."""
    if isinstance(probe, Logits):
        return "logits"
    if isinstance(probe, Distribution):
        return "distribution"
    if isinstance(probe, Logprob | Logprobs):
        return "logprobs"
    if isinstance(probe, Entropy):
        return "entropy"
    if isinstance(probe, Embedding):
        return "embedding"
    raise TypeError(f"not a probe: {type(probe).__name__}; use Logits(), Distribution(), Logprob(t), "
                    "Logprobs([...]), Entropy() or Embedding()")
