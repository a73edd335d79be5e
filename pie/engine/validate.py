"""The one set of range checks for a forward pass, shared by the runtime and the engine (numpy + stdlib only).

The runtime checks every pass as it arrives (`pie.runtime.forward_pass`, as
`HostError`s naming the slot) and marks the batches it builds from checked
passes `ForwardBatch.validated`; the engine runs `check_request` only for
batches that are not so marked (`pie.engine.batch_prep`, as `BatchError`s
naming the request). Every value is checked against the range the engine can
really execute, not just bounded from below: an unbounded position, `top_k`
or draw count would otherwise make the device step raise for everyone.

Each check raises `InvalidValue` with a message that says what and the
numbers, without saying where; the caller prefixes the location and picks the
exception type of its layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pie.engine.batch import OutputSpec, Probe, Request, Sampler

# Positions and token ids travel to the device as int32 (`batch_prep`); every RoPE table is far below this.
MAX_POSITION = 2**31 - 1
# Draws per sampler row: each draw is one uniform and one searchsorted row of the vocabulary.
MAX_DRAWS = 1024
# OpenAI's ranges for the sampler penalties and the logit bias.
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
_SEED_MOD = 2**64


class InvalidValue(ValueError):
    """A pass value outside the range the engine executes; the message has the value and the range."""


@dataclass(frozen=True)
class Limits:
    """What one engine can execute: its pool, vocabulary and batch limits."""

    num_pages: int
    page_size: int
    vocab_size: int
    max_batch_tokens: int
    max_batch_size: int
    max_dist_size: int
    max_num_embeds: int
    num_swap_slots: int = 0
    max_position: int = MAX_POSITION
    max_draws: int = MAX_DRAWS
    num_state_slots: int = 0  # a hybrid model's recurrent-state pool; 0: the model keeps no state
    num_state_swap_slots: int = 0


def seed64(seed: int) -> int:
    """`seed` reduced mod 2**64 into int64's range: any Python int is a valid seed, equal mod 2**64 seeds agree."""
    s = int(seed) % _SEED_MOD
    return s - _SEED_MOD if s >= 2**63 else s


def check_ids(values: Sequence[int], bound: int, what: str, range_name: str = "") -> None:
    """Every value in [0, bound); `what` names them ("token id"), `range_name` the range ("the vocabulary")."""
    if len(values) and (min(values) < 0 or max(values) >= bound):
        bad = next(v for v in values if not 0 <= v < bound)
        raise InvalidValue(f"{what} {bad} is outside {range_name + ' ' if range_name else ''}[0, {bound})")


def check_sampler(s: Sampler, vocab_size: int, max_draws: int = MAX_DRAWS) -> None:
    if not (math.isfinite(s.temperature) and s.temperature >= 0.0):
        raise InvalidValue(f"temperature = {s.temperature} is out of range: a finite number >= 0 (0 = argmax)")
    if not 0 <= s.top_k <= vocab_size:
        raise InvalidValue(f"top_k = {s.top_k} is out of range [0, {vocab_size}] (0 = off; the vocabulary size)")
    if not 0.0 < s.top_p <= 1.0:  # NaN fails every comparison, so it lands here too
        raise InvalidValue(f"top_p = {s.top_p} is out of range (0, 1]")
    if not 0.0 <= s.min_p <= 1.0:
        raise InvalidValue(f"min_p = {s.min_p} is out of range [0, 1]")
    if not 1 <= s.draws <= max_draws:
        raise InvalidValue(f"draws = {s.draws} is out of range [1, {max_draws}]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
            raise InvalidValue(f"{name} = {value} is out of range [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}]")
    if not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0.0):
        raise InvalidValue(f"repetition_penalty = {s.repetition_penalty} is out of range: a finite number > 0 "
                           "(1 = off)")
    for token, bias in s.logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidValue(f"logit_bias token {token} is outside the vocabulary [0, {vocab_size})")
        if not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
            raise InvalidValue(f"logit_bias {bias} for token {token} is out of range "
                               f"[-{MAX_ABS_LOGIT_BIAS}, {MAX_ABS_LOGIT_BIAS}]")
    check_ids(s.penalty_tokens, vocab_size, "penalty token", "the vocabulary")


def check_probe(p: Probe, vocab_size: int, max_dist_size: int) -> None:
    if not (math.isfinite(p.temperature) and p.temperature >= 0.0):
        raise InvalidValue(f"probe temperature must be a finite number >= 0, got {p.temperature}")
    if p.kind == "distribution" and not 0 <= p.k <= max_dist_size:
        raise InvalidValue(f"a distribution of {p.k} entries is over max_dist_size = {max_dist_size}; "
                           "ask for fewer or raise max_dist_size (k = 0 gives the most allowed)")
    if p.kind in ("logprob", "logprobs"):
        if not p.tokens:
            raise InvalidValue(f"a {p.kind} probe needs at least one token to score")
        if len(p.tokens) > vocab_size:
            raise InvalidValue(f"{len(p.tokens)} logprob tokens: more than the vocabulary holds ({vocab_size})")
        bad = [t for t in p.tokens if not 0 <= t < vocab_size]
        if bad:
            raise InvalidValue(f"token {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_logit_mask(runs: Sequence[int], vocab_size: int) -> None:
    """A BRLE over (a prefix of) the vocabulary that allows at least one token; the message follows the
    mask's name ("logit mask ...")."""
    if any(r < 0 for r in runs):
        raise InvalidValue("has a negative run length")
    if sum(runs) > vocab_size:
        raise InvalidValue(f"covers {sum(runs)} tokens, over the vocabulary of {vocab_size}")
    if not any(runs[1::2]):
        raise InvalidValue("allows no token; at least one must be allowed")


def check_attention_mask(rows: Sequence[Sequence[int]], q_len: int, kv_len: int) -> None:
    """One BRLE row per input token, each covering exactly kv_len slots and attending to at least one; the
    message follows the mask's name ("attention mask ...")."""
    if len(rows) != q_len:
        raise InvalidValue(f"has {len(rows)} rows for {q_len} input tokens; give one BRLE per token")
    for i, row in enumerate(rows):
        if any(r < 0 for r in row):
            raise InvalidValue(f"row {i} has a negative run length")
        if sum(row) != kv_len:
            raise InvalidValue(f"row {i} covers {sum(row)} slots; each row must cover the kv length {kv_len}")
        if not any(row[1::2]):
            raise InvalidValue(f"row {i} attends to nothing; every token must see at least one slot")


def check_outputs(outputs: Sequence[OutputSpec], q_len: int, limits: Limits) -> None:
    """Each output reads an input row and has exactly one of sampler / probe in range."""
    embeds = 0
    for j, o in enumerate(outputs):
        if not 0 <= o.index < q_len:
            raise InvalidValue(f"output {j} reads row {o.index}, but the request has {q_len} rows")
        if (o.sampler is None) == (o.probe is None):
            raise InvalidValue(f"output {j} must have exactly one of sampler or probe")
        try:
            if o.sampler is not None:
                check_sampler(o.sampler, limits.vocab_size, limits.max_draws)
            else:
                assert o.probe is not None
                check_probe(o.probe, limits.vocab_size, limits.max_dist_size)
                embeds += o.probe.kind == "embedding"
        except InvalidValue as e:
            raise InvalidValue(f"output {j}: {e}") from None
    if embeds > limits.max_num_embeds:
        raise InvalidValue(f"{embeds} embeddings asked for, over max_num_embeds = {limits.max_num_embeds}")


def kv_len_of(r: Request, page_size: int) -> int:
    return (len(r.page_ids) - 1) * page_size + r.last_page_len


def check_request(i: int, r: Request, limits: Limits, arrays: bool = True) -> None:
    """Everything about one request the engine relies on; the message starts with "request i: ".

    arrays=False leaves out the O(length) ranges of page ids, token ids and positions, which the engine
    checks vectorised over the whole batch (and then calls this, with arrays, on the request at fault)."""
    try:
        _check_shape(r, limits)
        if arrays:
            _check_ids(r, limits)
        _check_values(r, limits)
    except InvalidValue as e:
        raise InvalidValue(f"request {i}: {e}") from None


def _check_shape(r: Request, limits: Limits) -> None:
    q_len = len(r.tokens)
    if q_len == 0:
        raise InvalidValue("no input tokens")
    if len(r.positions) != q_len:
        raise InvalidValue(f"{q_len} tokens but {len(r.positions)} positions; they must match")
    if len(r.page_ids) == 0:
        raise InvalidValue("no KV pages")
    if not 1 <= r.last_page_len <= limits.page_size:
        raise InvalidValue(f"last_page_len = {r.last_page_len} is out of range 1..{limits.page_size}")
    kv_len = kv_len_of(r, limits.page_size)
    if kv_len < q_len:
        raise InvalidValue(f"{q_len} tokens to write but its pages hold only {kv_len} slots "
                           "(pages * page_size, with the last page filled to last_page_len)")


def _check_ids(r: Request, limits: Limits) -> None:
    try:
        check_ids(r.page_ids, limits.num_pages, "page id")
    except InvalidValue:
        bad = next(p for p in r.page_ids if not 0 <= p < limits.num_pages)
        raise InvalidValue(f"page id {bad} is out of range: the pool has pages 0..{limits.num_pages - 1}") from None
    check_ids(r.tokens, limits.vocab_size, "token id", "the vocabulary")
    check_ids(r.positions, limits.max_position, "position")


def _check_values(r: Request, limits: Limits) -> None:
    check_outputs(r.outputs, len(r.tokens), limits)
    try:
        if r.attention_mask is not None:
            check_attention_mask(r.attention_mask, len(r.tokens), kv_len_of(r, limits.page_size))
    except InvalidValue as e:
        raise InvalidValue(f"attention mask {e}") from None
    try:
        if r.logit_mask:
            check_logit_mask(r.logit_mask, limits.vocab_size)
    except InvalidValue as e:
        raise InvalidValue(f"logit mask {e}") from None
    if r.seed is not None and not isinstance(r.seed, int | np.integer):
        raise InvalidValue(f"seed {r.seed!r} is not an integer")
    if r.zo_seed is not None and (r.adapter is None or not isinstance(r.zo_seed, int | np.integer)):
        raise InvalidValue(f"zo_seed {r.zo_seed!r} needs an integer seed and an adapter (it perturbs the adapter)")


def check_state_slots(reqs: Sequence[Request], limits: Limits) -> None:
    """The requests' state slots as one batch: each present exactly on a hybrid model, in range, and no slot
    named twice (two sequences advancing one state would each see the other's tokens). The message starts
    with "request i: "."""
    hybrid = limits.num_state_slots > 0
    seen: dict[int, int] = {}
    for i, r in enumerate(reqs):
        slot = r.state_slot
        if slot is None:
            if hybrid:
                raise InvalidValue(f"request {i}: this hybrid model keeps a recurrent state per sequence; the "
                                   f"request must name its state slot (0..{limits.num_state_slots - 1})")
            continue
        if not hybrid:
            raise InvalidValue(f"request {i}: state_slot = {slot} given, but this model keeps no recurrent state "
                               "(only hybrid models have state slots); leave it None")
        if not isinstance(slot, int | np.integer) or not 0 <= slot < limits.num_state_slots:
            raise InvalidValue(f"request {i}: state slot {slot!r} is out of range: the pool has slots "
                               f"0..{limits.num_state_slots - 1}")
        if slot in seen:
            raise InvalidValue(f"request {i}: state slot {slot} is also named by request {seen[slot]}; each "
                               "sequence of a batch needs its own slot (copy the slot to fork)")
        seen[int(slot)] = i
        if r.attention_mask is not None:
            raise InvalidValue(f"request {i}: a custom attention mask cannot apply to a hybrid model: its "
                               "recurrent layers fold every token into the state in order, so no token can be "
                               "masked out of it")
        if r.adapter is not None:
            raise InvalidValue(f"request {i}: LoRA adapters are not supported on hybrid models: a context cut "
                               "back (truncate, a rollback) is recomputed from its token record, and adapter KV "
                               "and state cannot be; run the base model")


def check_state_ops(copies: Sequence[tuple[int, int]], swap_out: Sequence[tuple[int, int]],
                    swap_in: Sequence[tuple[int, int]], limits: Limits) -> None:
    """A batch's state copies and swaps: device slots and host slots in range."""
    def device(slot: int, what: str) -> None:
        if not 0 <= slot < limits.num_state_slots:
            pool = (f"slots 0..{limits.num_state_slots - 1}" if limits.num_state_slots
                    else "no slots (the model keeps no recurrent state)")
            raise InvalidValue(f"{what} state slot {slot} is out of range: the pool has {pool}")

    def host(slot: int, what: str) -> None:
        if not 0 <= slot < limits.num_state_swap_slots:
            raise InvalidValue(f"{what} host state slot {slot} is out of range: the host state pool has "
                               f"{limits.num_state_swap_slots} slots (set state_swap_pool_size to enable or "
                               "enlarge it)")

    for src, dst in copies:
        device(src, "state copy source")
        device(dst, "state copy destination")
    for slot, host_slot in swap_out:
        device(slot, "state swap-out source")
        host(host_slot, "state swap-out destination")
    for host_slot, slot in swap_in:
        host(host_slot, "state swap-in source")
        device(slot, "state swap-in destination")
