"""The engine's one call: a forward batch in, per-output results back.

This is the contract between the runtime (which owns pages, positions and
policies) and the engine (which owns tensors). Everything here is plain
Python data so it can cross a process boundary as msgpack (see
`pie.engine.wire`). The engine never learns what an inferlet is: a request is
just "these tokens, at these positions, appended to the KV of these pages".

KV layout contract: a request's pages hold its KV sequence in order. After the
pass the sequence length is `kv_len = (len(page_ids) - 1) * page_size +
last_page_len`, and the request's new tokens occupy the last `len(tokens)`
slots of it. Everything before them must already have been written by earlier
passes (or copied in with `page_copies`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np

SamplerKind: TypeAlias = Literal["argmax", "multinomial", "top_k", "top_p", "min_p", "top_k_top_p"]
ProbeKind: TypeAlias = Literal["distribution", "logprob", "logprobs", "entropy", "logits", "embedding"]

SAMPLER_KINDS: frozenset[str] = frozenset(SamplerKind.__args__)  # type: ignore[attr-defined]
PROBE_KINDS: frozenset[str] = frozenset(ProbeKind.__args__)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Sampler:
    """How to pick a token at one output row.

    `temperature == 0` (or kind "argmax") is exact argmax. `draws > 1` only
    applies to "multinomial": that many independent draws from one row.

    Penalties and the logit bias change the row's logits before the logit
    mask, temperature and filters (greedy rows included), in this order:
    - logit_bias: (token, bias) pairs added to those logits (OpenAI's `logit_bias`);
    - repetition_penalty (1 = off): each token in `penalty_tokens` has its
      logit divided by it when positive, multiplied when negative (HF / vLLM);
    - presence_penalty: subtracted once from each token in `penalty_tokens`;
    - frequency_penalty: subtracted once per occurrence in `penalty_tokens`.
    `penalty_tokens` is the history they count (for OpenAI's definitions: the
    tokens generated so far). It lives on the sampler, not the request, so it
    reaches the engine unchanged through the scheduler, and each sampled row
    (a speculative draft's, say) can count its own history.
    """

    kind: SamplerKind = "argmax"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    draws: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    penalty_tokens: tuple[int, ...] = ()

    @property
    def penalizes(self) -> bool:
        """Whether a penalty changes the logits: one is on and there is a history (the bias is separate)."""
        return bool(self.penalty_tokens) and (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                                              or self.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True)
class Probe:
    """What to read off one output row instead of (or beside) sampling.

    - distribution: top-`k` (token, prob) of softmax(logits / temperature);
      k == 0 means "as many as allowed" (`max_dist_size`).
    - logprob / logprobs: log-softmax (no temperature) at `tokens`.
    - entropy: of softmax(logits) in nats (no temperature).
    - logits: the raw float32 logits row, little-endian bytes.
    - embedding: the final hidden state (after the last norm), float32 bytes.
    """

    kind: ProbeKind
    temperature: float = 1.0
    k: int = 0
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One output slot: row `index` of the request's input tokens, with a sampler or a probe."""

    index: int
    sampler: Sampler | None = None
    probe: Probe | None = None


@dataclass(slots=True)
class Request:
    """One sequence's part of a batch.

    attention_mask: one BRLE per input token, each covering the whole `kv_len`
      (true = attend; runs alternate starting with a *false* run). None means
      causal: new token i attends to every slot up to and including its own.
    logit_mask: one BRLE over the vocabulary (true = allowed), applied to every
      sampler output of this request. None or [] means no restriction.
    seed: makes this request's random draws a function of (seed, position,
      draw) only, so its tokens do not depend on what else is in the batch.
    adapter: a resident LoRA slot, or None for the base model.
    page_ids (and tokens, positions) may also be 1-D numpy int arrays, e.g. a
      runtime's incremental page table: the engine concatenates arrays without
      converting Python ints one by one (the wire sends them as lists).
    zo_seed: run the adapter perturbed, as theta + sigma * eps(zo_seed) (`pie.engine.zo`); needs an adapter
      with a zo state.
    images: (image key, row of the image's first token in `tokens`) of each image the engine prepared
      (`Engine.prepare_image`) whose rows fall in this request; the row is negative when the image began in
      an earlier pass. Its embedding rows take the vision tower's output instead of token embeddings.
    state_slot: the sequence's recurrent-state slot on a hybrid model (required there, refused on any
      other; `EngineInfo.num_state_slots`). The slot holds the state after the sequence's first
      `kv_len - len(tokens)` tokens and holds the state after all of them once the pass ran; a request
      whose first new token is at kv slot 0 starts fresh (the engine zeroes the slot). The runtime
      chooses slots as it chooses pages; two requests of one batch never share one.
    """

    tokens: list[int]
    positions: list[int]
    page_ids: list[int]
    last_page_len: int
    outputs: list[OutputSpec] = field(default_factory=list)
    attention_mask: list[list[int]] | None = None
    logit_mask: list[int] | None = None
    adapter: int | None = None
    seed: int | None = None
    zo_seed: int | None = None
    images: list[tuple[str, int]] | None = None
    state_slot: int | None = None


@dataclass(slots=True)
class StepRows:
    """Decode steps as arrays: row i is a one-token request that appends `tokens[i]` at `positions[i]` to
    the KV of pages `page_ids[page_indptr[i]:page_indptr[i + 1]]` (the last filled to `last_page_len[i]`)
    and samples one token with `samplers[sampler_ids[i]]`.

    The runtime's run-ahead streams (`pie.runtime.lane`) keep their state in arrays and hand a batch's
    decode steps over in this form, so a step of 256 streams is a few array operations instead of 256
    `Request` objects. Per-row extras (seed, logit mask, adapter) are lists, present only when a row has
    one. `token_from[i] >= 0`: the input token is row `token_from[i]` of the steps of the batch run just
    before (a chained step), filled in by the engine client (`pie.runtime.engine_client.resolve_chained`).
    An engine that only takes requests runs `requests()` and reports their tokens (`run_expanded`).
    """

    tokens: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    page_indptr: np.ndarray  # int64 [n + 1]
    page_ids: np.ndarray  # int32 [page_indptr[-1]]
    last_page_len: np.ndarray  # int64 [n]
    samplers: list[Sampler]  # the distinct samplers of the rows
    sampler_ids: np.ndarray  # int64 [n], into `samplers`
    seeds: list[int | None] | None = None
    logit_masks: list[list[int] | None] | None = None
    adapters: list[int | None] | None = None
    token_from: np.ndarray | None = None  # int64 [n]; -1: `tokens[i]` as is

    def __len__(self) -> int:
        return len(self.positions)

    def requests(self) -> list[Request]:
        """The same rows as `Request`s (their input tokens resolved), for engines that take only those."""
        assert self.token_from is None, "resolve a chained block's tokens before expanding it"
        ptr, pages = self.page_indptr.tolist(), self.page_ids.tolist()
        outputs = [[OutputSpec(0, s)] for s in self.samplers]  # shared per sampler: nothing mutates them
        sid, lpl = self.sampler_ids.tolist(), self.last_page_len.tolist()
        n = len(sid)
        seeds, masks, adapters = (self.seeds or [None] * n, self.logit_masks or [None] * n,
                                  self.adapters or [None] * n)
        return [Request([t], [p], pages[ptr[i]:ptr[i + 1]], lpl[i], outputs[sid[i]], None, masks[i], adapters[i],
                        seeds[i])
                for i, (t, p) in enumerate(zip(self.tokens.tolist(), self.positions.tolist(), strict=True))]


@dataclass(slots=True)
class ForwardBatch:
    """A step: any mix of prefill and decode requests, plus page operations done first, in this order:

    swap_out: (device_page, host_slot) pairs copied to the host swap pool (a suspended context);
    swap_in: (host_slot, device_page) pairs copied back (a resumed context);
    page_copies: (src_page, dst_page) pairs copied whole, e.g. the working page of a forked context.

    Then the same three for recurrent-state slots (hybrid models only, after the page operations):
    state_swap_out: (slot, host_slot) pairs; state_swap_in: (host_slot, slot) pairs;
    state_copies: (src_slot, dst_slot) pairs (fork; a checkpoint of a prefix's state). They run before
    the forward, so a copy out of a slot the batch also advances sees the state before this batch.

    A batch may carry page or state operations and no requests.

    validated: the runtime built it from passes it checked with
    `pie.engine.validate` against this engine's limits, so the engine skips
    the per-request checks (the O(1) limits, the page ids and the token and
    position ranges, checked vectorised, stay).
    """

    requests: list[Request]
    page_copies: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    validated: bool = False
    steps: StepRows | None = None  # decode steps in arrays, after `requests` (see StepRows)
    state_copies: list[tuple[int, int]] = field(default_factory=list)
    state_swap_out: list[tuple[int, int]] = field(default_factory=list)
    state_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        steps = self.steps
        return sum(len(r.tokens) for r in self.requests) + (len(steps) if steps is not None else 0)


# One value per OutputSpec, in order:
#   sampler -> int (draws == 1) or list[int] (draws > 1)
#   distribution -> (list[int], list[float]); logprob -> float; logprobs -> list[float]
#   entropy -> float; logits / embedding -> bytes (float32, little-endian)
OutputValue: TypeAlias = int | list[int] | float | list[float] | tuple[list[int], list[float]] | bytes


@dataclass(slots=True)
class BatchResult:
    """outputs[i][j] is the value of requests[i].outputs[j]."""

    outputs: list[list[OutputValue]]
    timings_ms: dict[str, float] = field(default_factory=dict)
    steps: np.ndarray | None = None  # int64: the token each row of `ForwardBatch.steps` sampled


def expanded(batch: ForwardBatch) -> ForwardBatch:
    """The batch with its step rows as requests after its own (`StepRows.requests`), for an engine that
    takes only requests; `fold_steps` gives its result the batch's shape back."""
    steps = batch.steps
    if steps is None:
        return batch
    return ForwardBatch(batch.requests + steps.requests(), batch.page_copies, batch.swap_out, batch.swap_in,
                        batch.validated)


def run_expanded(forward: Callable[[ForwardBatch], BatchResult], batch: ForwardBatch) -> BatchResult:
    """`forward(batch)` for an engine that takes only requests: the step rows run as requests after the
    batch's own, and their tokens come back in `BatchResult.steps`."""
    if batch.steps is None:
        return forward(batch)
    return fold_steps(forward(expanded(batch)), len(batch.requests))


def fold_steps(result: BatchResult, num_requests: int) -> BatchResult:
    """The result of an expanded batch (`StepRows.requests` after `num_requests` requests) in the
    batch's own shape: the steps' tokens as one array."""
    outputs = result.outputs
    tokens = np.fromiter((o[0] for o in outputs[num_requests:]), dtype=np.int64,
                         count=len(outputs) - num_requests)
    return BatchResult(outputs[:num_requests], result.timings_ms, tokens)
