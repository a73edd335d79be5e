"""Host-side batch preparation: check a ForwardBatch and flatten it into one packed int32 upload.

Every user-caused problem (a page out of range, mismatched lengths, a value out
of its range, a batch over the limits, a malformed mask) raises `BatchError`
naming the request and the numbers, before any device work, so a bad batch
never leaves the KV pool half-written and the engine serves the next batch as
usual; the runtime then retries the batch's passes one by one, so only the
culprit fails. The per-request checks (`pie.engine.validate`) are skipped for
batches the runtime marks `validated`; the cheap vectorised ones (lengths,
page ids, token and position ranges) always run.

The flattening is array work over the whole batch: token ids, positions, page
tables (one flat array + offsets), kv lengths and the slot each new token's
K/V goes to are built with numpy in one pass, with no per-request arrays.
Decode steps given as arrays (`ForwardBatch.steps`) are rows after the
requests', concatenated as they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain

import numpy as np

from pie.engine import brle
from pie.engine.attention.base import BatchLayout
from pie.engine.batch import ForwardBatch, OutputSpec, Request, StepRows
from pie.engine.outputs import OutputPlan, plan_outputs
from pie.engine.packing import Packed, Packer
from pie.engine.validate import (
    InvalidValue,
    Limits,
    check_attention_mask,
    check_request,
    check_state_ops,
    check_state_slots,
    seed64,
)
from pie.errors import BatchError

__all__ = ["Limits", "PreparedBatch", "check_page_ops", "prepare"]


@dataclass
class PreparedBatch:
    tokens: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    write_page: np.ndarray  # [T] int64
    write_offset: np.ndarray  # [T] int64
    layout: BatchLayout
    outputs: OutputPlan
    packed: Packed  # "token_rows" ([4, T]: the four arrays above) + the outputs' sections
    # Hybrid models: each request's state slot, and whether it starts its sequence (kv slot 0: zero the slot).
    state_slots: list[int] | None = None
    fresh: list[bool] | None = None


def check_page_ops(batch: ForwardBatch, limits: Limits) -> None:
    """Validate swaps and copies (a batch may be nothing but these)."""
    for src, dst in batch.page_copies:
        _check_page(src, limits, "page copy source")
        _check_page(dst, limits, "page copy destination")
    for page, slot in batch.swap_out:
        _check_page(page, limits, "swap-out source")
        _check_slot(slot, limits)
    for slot, page in batch.swap_in:
        _check_slot(slot, limits)
        _check_page(page, limits, "swap-in destination")
    if batch.state_copies or batch.state_swap_out or batch.state_swap_in:
        try:
            check_state_ops(batch.state_copies, batch.state_swap_out, batch.state_swap_in, limits)
        except InvalidValue as e:
            raise BatchError(str(e)) from None


def _check_slot(slot: int, limits: Limits) -> None:
    if not 0 <= slot < limits.num_swap_slots:
        raise BatchError(f"swap slot {slot} is out of range: the host swap pool has {limits.num_swap_slots} slots "
                         "(set swap_pool_size or cpu_mem_budget_in_gb to enable or enlarge it)")


def _check_page(page: int, limits: Limits, what: str) -> None:
    if not 0 <= page < limits.num_pages:
        raise BatchError(f"{what} page id {page} is out of range: the pool has pages 0..{limits.num_pages - 1}")


def prepare(batch: ForwardBatch, limits: Limits, rng: random.Random) -> PreparedBatch:
    reqs, steps = batch.requests, batch.steps
    if (batch.page_copies or batch.swap_in or batch.swap_out or batch.state_copies or batch.state_swap_out
            or batch.state_swap_in):
        check_page_ops(batch, limits)
    num_rows = len(reqs) + (len(steps) if steps is not None else 0)
    if not num_rows:
        raise BatchError("empty batch: at least one request is needed")
    if num_rows > limits.max_batch_size:
        raise BatchError(f"batch has {num_rows} requests, over max_batch_size = {limits.max_batch_size}; "
                         "split it or raise max_batch_size")
    num_tokens = batch.num_tokens
    if num_tokens > limits.max_batch_tokens:
        raise BatchError(f"batch has {num_tokens} tokens, over max_batch_tokens = {limits.max_batch_tokens}; "
                         "chunk the prefill or raise max_batch_tokens")
    try:
        if not batch.validated:
            for i, r in enumerate(reqs):
                check_request(i, r, limits, arrays=False)  # the arrays are checked vectorised in _flatten
        if steps is not None:
            if steps.token_from is not None:
                raise InvalidValue("decode steps chained to another batch reached the engine unresolved")
            if limits.num_state_slots:
                raise InvalidValue("decode steps in arrays name no state slot; a hybrid model takes requests")
            if not batch.validated:
                for i, sampler in enumerate(steps.samplers):
                    check_request(i, Request([0], [0], [0], 1, [OutputSpec(0, sampler)]), limits, arrays=False)
        if limits.num_state_slots or not batch.validated:  # a dense model's validated batch names no slot
            check_state_slots(reqs, limits)
        prep = _flatten(reqs, num_tokens, limits, rng, steps)
        if limits.num_state_slots:
            prep.state_slots = [int(r.state_slot) for r in reqs]  # type: ignore[arg-type]  # checked above
            prep.fresh = (prep.layout.kv_lens == np.diff(prep.layout.qo_indptr)).tolist()
        return prep
    except InvalidValue as e:
        raise BatchError(str(e)) from None
    except (ValueError, TypeError, OverflowError, IndexError) as e:
        # A value the vectorised pass could not even convert (a position of 2**63, a token that is a
        # string): find the request it belongs to, so only that request's pass fails.
        _blame(reqs, limits, e)
        raise


def _blame(reqs: list[Request], limits: Limits, error: Exception) -> None:
    """Raise a BatchError naming the first request that fails its checks (or fails alone)."""
    for i, r in enumerate(reqs):
        try:
            check_request(i, r, limits)
            _flatten([r], len(r.tokens), limits, random.Random(0))
        except InvalidValue as e:
            raise BatchError(str(e)) from None
        except (ValueError, TypeError, OverflowError, IndexError) as e:
            raise BatchError(f"request {i}: cannot be prepared: {type(e).__name__}: {e}") from None


def _flatten(reqs: list[Request], num_tokens: int, limits: Limits, rng: random.Random,
             steps: StepRows | None = None) -> PreparedBatch:
    nr, ps = len(reqs), limits.page_size
    ns = len(steps) if steps is not None else 0
    n = nr + ns
    q_lens = np.fromiter((len(r.tokens) for r in reqs), np.int64, nr)
    pos_lens = np.fromiter((len(r.positions) for r in reqs), np.int64, nr)
    num_pages = np.fromiter((len(r.page_ids) for r in reqs), np.int64, nr)
    last = np.fromiter((r.last_page_len for r in reqs), np.int64, nr)
    req_tokens = int(q_lens.sum())
    tokens = _concat([r.tokens for r in reqs], req_tokens)
    positions = _concat([r.positions for r in reqs], req_tokens)
    pages = _concat([r.page_ids for r in reqs], int(num_pages.sum()))
    if steps is not None:  # one row each, already arrays: appended as they are
        ones = np.ones(ns, np.int64)
        q_lens, pos_lens = np.concatenate([q_lens, ones]), np.concatenate([pos_lens, ones])
        num_pages = np.concatenate([num_pages, np.diff(steps.page_indptr)])
        last = np.concatenate([last, steps.last_page_len])
        tokens = np.concatenate([tokens, steps.tokens]).astype(np.int64, copy=False)
        positions = np.concatenate([positions, steps.positions]).astype(np.int64, copy=False)
        pages = np.concatenate([pages, steps.page_ids]).astype(np.int64, copy=False)
    kv_lens = (num_pages - 1) * ps + last
    bad = (q_lens < 1) | (pos_lens != q_lens) | (num_pages < 1) | (last < 1) | (last > ps) | (kv_lens < q_lens)
    if bad.any():
        _reject(reqs, int(np.argmax(bad)), limits)
    qo_indptr = np.zeros(n + 1, np.int64)
    np.cumsum(q_lens, out=qo_indptr[1:])
    page_indptr = np.zeros(n + 1, np.int64)
    np.cumsum(num_pages, out=page_indptr[1:])
    for values, bound, indptr in ((tokens, limits.vocab_size, qo_indptr), (positions, limits.max_position, qo_indptr),
                                  (pages, limits.num_pages, page_indptr)):
        if values.min() < 0 or values.max() >= bound:
            first = int(np.argmax((values < 0) | (values >= bound)))
            _reject(reqs, int(np.searchsorted(indptr, first, side="right")) - 1, limits)
    # Token t of request r is written at kv slot kv_len[r] - q_len[r] + (t - qo_indptr[r]).
    req_of = np.arange(n) if num_tokens == n else np.repeat(np.arange(n), q_lens)
    slot = (kv_lens - q_lens)[req_of] + np.arange(num_tokens) - qo_indptr[req_of]
    write_page = pages[page_indptr[req_of] + slot // ps]
    write_offset = slot % ps
    layout = BatchLayout(qo_indptr=qo_indptr.astype(np.int32), kv_page_indptr=page_indptr.astype(np.int32),
                         kv_page_indices=pages.astype(np.int32), kv_last_page_len=last.astype(np.int32),
                         kv_lens=kv_lens.astype(np.int32),
                         custom_masks=_attention_masks(reqs, q_lens, kv_lens) + [None] * ns)
    packer = Packer()
    packer.add("token_rows", np.stack([tokens, positions, write_page, write_offset]))
    seeds = [seed64(r.seed) if r.seed is not None else rng.getrandbits(63) for r in reqs]
    if steps is not None:
        seeds += [seed64(s) if s is not None else rng.getrandbits(63) for s in steps.seeds] if steps.seeds else [
            rng.getrandbits(63) for _ in range(ns)]
    plan = plan_outputs(reqs, qo_indptr, positions, seeds, limits.vocab_size, limits.max_dist_size, packer, steps)
    return PreparedBatch(tokens, positions, write_page, write_offset, layout, plan, packer.finish())


def _concat(parts: list[list[int]] | list[np.ndarray], count: int) -> np.ndarray:
    """One int64 array of all parts: numpy arrays (a runtime's incremental page tables) are concatenated,
    lists converted in one pass (numpy's fastest path for Python ints)."""
    if not parts:
        return np.zeros(0, np.int64)
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts).astype(np.int64, copy=False)
    return np.fromiter(chain.from_iterable(parts), np.int64, count)


def _reject(reqs: list[Request], i: int, limits: Limits) -> None:
    if i >= len(reqs):  # a decode step row (`ForwardBatch.steps`)
        raise InvalidValue(f"decode step {i - len(reqs)}: its page ids, token id or position are out of range")
    check_request(i, reqs[i], limits)  # raises with the precise message
    raise InvalidValue(f"request {i}: its lengths, page ids, token ids or positions are out of range")


def _attention_masks(reqs: list[Request], q_lens: np.ndarray, kv_lens: np.ndarray) -> list[np.ndarray | None]:
    masks: list[np.ndarray | None] = [None] * len(reqs)
    for i, r in enumerate(reqs):
        if r.attention_mask is None:
            continue
        try:
            check_attention_mask(r.attention_mask, int(q_lens[i]), int(kv_lens[i]))
            masks[i] = np.stack([brle.decode(row, int(kv_lens[i])) for row in r.attention_mask])
        except InvalidValue as e:
            raise InvalidValue(f"request {i}: attention mask {e}") from None
    return masks
