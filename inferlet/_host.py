"""The host interface: everything the SDK asks of the runtime.

The SDK (`inferlet.*`) is a thin, typed layer over this protocol. Two
implementations exist:

- trusted mode: `pie.runtime.host.InstanceHost`, a per-instance object in the
  server process, installed for the inferlet's task through `use_host`;
- isolated mode: `pie.runtime.sandbox.client.RemoteHost`, in a sandbox
  subprocess, forwarding each call over IPC to an `InstanceHost`.

So every argument and result is plain data (str, int, float, bool, bytes,
list, dict, None) that msgpack carries unchanged. Resources (contexts,
subscriptions, adapters) are integer handles owned by the instance; the
runtime frees them all when the instance ends. Failures raise `HostError`
with a message meant for the inferlet author.

Calls that wait are `async`; the rest return at once.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypedDict


class HostError(Exception):
    """A host call failed (bad argument, missing snapshot, out of pages, limit reached, ...)."""


class SamplerDict(TypedDict, total=False):
    # kind: argmax | multinomial | top_k | top_p | min_p | top_k_top_p
    kind: str
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    draws: int
    # Penalties (see inferlet.sample.Sampler): over the tokens in penalty_tokens; logit_bias as [token, bias] pairs.
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: list[list[float]]
    penalty_tokens: list[int]


class ProbeDict(TypedDict, total=False):
    # kind: distribution | logprob | logprobs | entropy | logits | embedding
    kind: str
    temperature: float
    k: int
    tokens: list[int]


class SlotDict(TypedDict, total=False):
    """One output slot. A sampler slot yields one token per index; a probe slot reads one row."""

    indices: list[int]  # rows of this pass's inputs (sampler slots)
    sampler: SamplerDict
    index: int  # row (probe slots)
    probe: ProbeDict


class PassDict(TypedDict, total=False):
    """A forward pass on one context. Inputs are appended after the context's kv_len.

    tokens/positions: equal length, at least one token. attention_mask: one
    BRLE per token covering kv_len + len(tokens) (true = attend); omitted =
    causal. logit_mask: BRLE over the vocabulary (true = allowed) for every
    sampler slot. seed: makes sampling reproducible.
    """

    tokens: list[int]
    positions: list[int]
    attention_mask: list[list[int]] | None
    logit_mask: list[int] | None
    slots: list[SlotDict]
    adapter: int | None
    seed: int | None
    zo_seed: int | None  # run the adapter perturbed by this seed (inferlet.zo); needs `adapter`
    images: list[list[Any]] | None  # [image key, row of its first token] of each image the pass places


class StreamDict(TypedDict, total=False):
    """A run-ahead generation loop (`ctx_generate_start`): the runtime samples, appends and runs the next
    one-token pass by itself until a stop token, `max_tokens` tokens, or `stream_stop`.

    tokens: the buffered tokens to run first (at least one; the first token is sampled at the last).
    sampler: one token per step (draws = 1). stop: token ids that end it (the stop token is produced).
    logit_mask: a fixed BRLE for every step. depth: most steps produced ahead of `stream_next` (default 8).
    batch: `stream_next` waits for this many tokens (fewer only at the end; default 1, at most depth).
    """

    tokens: list[int]
    sampler: SamplerDict
    stop: list[int]
    max_tokens: int
    logit_mask: list[int] | None
    adapter: int | None
    seed: int | None
    depth: int | None
    batch: int | None


class Host(Protocol):
    # -- runtime --
    def version(self) -> str: ...
    def instance_id(self) -> str: ...
    def username(self) -> str: ...
    def models(self) -> list[str]: ...

    # -- model and tokenizer (model = a name from `models()`; "" = the default model) --
    def model_info(self, model: str) -> dict[str, Any]: ...  # name, page_size, vocab_size, stop_tokens, ...
    def tokenize(self, model: str, text: str) -> list[int]: ...
    def detokenize(self, model: str, tokens: list[int]) -> str: ...
    def vocabs(self, model: str) -> tuple[list[int], list[bytes]]: ...
    def special_tokens(self, model: str) -> tuple[list[int], list[bytes]]: ...
    def chat_tokens(self, model: str, role: str, text: str, parse_special: bool = False) -> list[int]: ...  # role: system|user|assistant|cue|seal; also tool, begin, tools (pie.runtime.tokenizer); special-token text in `text` is text unless parse_special
    def stop_tokens(self, model: str) -> list[int]: ...
    # a chat turn of text parts and images ({"image": key}) -> {"tokens": [...], "images": [[key, row], ...]}
    def chat_parts(self, model: str, role: str, parts: list[Any], parse_special: bool = False) -> dict[str, Any]: ...

    # -- images: prepared by the model's engines (decoded, preprocessed), placed by key in passes --
    def image_prepare(self, model: str, data: bytes) -> dict[str, Any]: ...  # key, tokens, embed_rows, grid, ...
    def audio_prepare(self, model: str, data: bytes) -> dict[str, Any]: ...  # key, tokens, embed_rows, seconds

    # -- contexts: a chain of KV pages, committed (full, shared) + working (mutable tail) --
    def ctx_create(self, model: str) -> int: ...
    def ctx_open(self, model: str, name: str) -> int: ...  # fork of a snapshot; snapshot stays
    def ctx_take(self, model: str, name: str) -> int: ...  # snapshot's pages move; snapshot deleted
    def ctx_delete(self, model: str, name: str) -> None: ...
    def ctx_fork(self, ctx: int) -> int: ...
    def ctx_save(self, ctx: int, name: str) -> None: ...  # fails if the name exists
    def ctx_snapshot(self, ctx: int) -> str: ...
    def ctx_destroy(self, ctx: int) -> None: ...
    def ctx_state(self, ctx: int) -> tuple[int, int, int]: ...  # committed pages, working pages, working tokens
    def ctx_next_position(self, ctx: int) -> int: ...  # position of the next token (kv_len less M-RoPE images' savings)
    def ctx_page_size(self, ctx: int) -> int: ...
    def ctx_reserve(self, ctx: int, num_pages: int) -> None: ...
    def ctx_release(self, ctx: int, num_pages: int) -> None: ...
    def ctx_commit(self, ctx: int, num_pages: int) -> None: ...
    def ctx_truncate(self, ctx: int, num_tokens: int) -> None: ...
    def ctx_set_priority(self, ctx: int, priority: float) -> None: ...
    async def ctx_forward(self, ctx: int, spec: PassDict) -> list[Any]: ...  # one value per slot
    # run-ahead generation: the runtime keeps the loop going; the context is the stream's until stream_stop
    def ctx_generate_start(self, ctx: int, spec: StreamDict) -> int: ...  # -> stream handle
    async def stream_next(self, stream: int) -> list[int]: ...  # tokens so far (>= 1, waits); [] when it ended
    def stream_stop(self, stream: int, consumed: int) -> None: ...  # context = step-by-step after `consumed`

    # -- session: this instance's client --
    def send(self, message: str) -> None: ...
    def send_file(self, data: bytes) -> None: ...
    async def receive(self) -> str: ...
    async def receive_file(self) -> bytes: ...

    # -- messaging between instances (topics scoped per user) --
    def push(self, topic: str, message: str) -> None: ...
    async def pull(self, topic: str) -> str: ...
    def broadcast(self, topic: str, message: str) -> None: ...
    def subscribe(self, topic: str) -> int: ...
    async def sub_next(self, sub: int) -> str | None: ...
    def unsubscribe(self, sub: int) -> None: ...

    # -- adapters (LoRA; names scoped per user) --
    def adapter_create(self, model: str, name: str) -> int: ...
    def adapter_open(self, model: str, name: str) -> int | None: ...
    def adapter_fork(self, adapter: int, new_name: str) -> int: ...
    def adapter_load(self, adapter: int, path: str) -> None: ...
    def adapter_save(self, adapter: int, path: str) -> None: ...
    # zeroth-order training (inferlet.zo): an evolution-strategy state, then one step per scored population
    def adapter_zo_initialize(self, adapter: int, rank: int, alpha: float, population_size: int,
                              mu_fraction: float, initial_sigma: float) -> None: ...
    def adapter_zo_update(self, adapter: int, scores: list[float], seeds: list[int], max_sigma: float) -> None: ...

    # -- scheduling: what inferlet.scheduling reports (ctx 0: no context); see that module --
    def scheduling(self, model: str, ctx: int) -> dict[str, float]: ...

    # -- MCP: the launching session's servers, then the operator's shared ones (pie.runtime.mcp) --
    def mcp_servers(self) -> list[str]: ...
    # method: a JSON-RPC method of MCP (tools/list, tools/call, ...); params: JSON text of its params.
    # -> [ok, JSON text]: the JSON-RPC result, or the error as {code, message, data}.
    async def mcp_call(self, server: str, method: str, params: str) -> list[Any]: ...


_current: contextvars.ContextVar[Host] = contextvars.ContextVar("inferlet_host")


def get_host() -> Host:
    try:
        return _current.get()
    except LookupError:
        raise HostError("no pie runtime: inferlet code must run inside `pie run` / `pie serve`") from None


@contextmanager
def use_host(host: Host) -> Iterator[None]:
    """Install `host` for the current task (and tasks it spawns); always restored."""
    token = _current.set(host)
    try:
        yield
    finally:
        _current.reset(token)
