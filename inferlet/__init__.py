"""pie's inferlet SDK: programs that drive generation themselves.

    from inferlet import Context, Model, Sampler

    async def main(input: dict) -> str:
        model = Model.load(input.get("model", ""))
        ctx = Context(model)
        ctx.system("You are helpful.").user(input["prompt"])
        return await ctx.generate(Sampler.argmax(), max_tokens=64).collect_text()

The API follows Pie's Python SDK 0.4 (see docs/inferlets.md for the
differences). Every call goes through the runtime's host interface
(`inferlet._host`), in the server process or from a sandbox.
"""

from __future__ import annotations

from inferlet import brle, chat, mcp, messaging, reasoning, runtime, session, tools
from inferlet._host import HostError
from inferlet._instance import get_return_value, set_return
from inferlet.adapter import Adapter
from inferlet.audio import Audio
from inferlet.context import Context
from inferlet.forward import Forward, Output, ProbeHandle, SampleHandle
from inferlet.generation import Generator, GenStep
from inferlet.grammar import (
    AnyJson,
    Constraint,
    Ebnf,
    Grammar,
    GrammarConstraint,
    GrammarError,
    JsonSchema,
    Matcher,
    Regex,
    Schema,
)
from inferlet.image import Image
from inferlet.model import Model, Tokenizer
from inferlet.sample import Distribution, Embedding, Entropy, Logits, Logprob, Logprobs, Sampler
from inferlet.spec import NgramSpeculator, Speculator

__all__ = [
    "Adapter", "AnyJson", "Audio", "Constraint", "Context", "Distribution", "Ebnf", "Embedding", "Entropy", "Forward",
    "GenStep", "Generator", "Grammar", "GrammarConstraint", "GrammarError", "HostError", "Image", "JsonSchema", "Logits",
    "Logprob", "Logprobs", "Matcher", "Model", "NgramSpeculator", "Output", "ProbeHandle", "Regex",
    "SampleHandle", "Sampler", "Schema", "Speculator", "Tokenizer", "brle", "chat", "get_return_value", "mcp",
    "messaging", "reasoning", "runtime", "session", "set_return", "tools",
]
