"""Host-side batch preparation: validate a ForwardBatch and flatten it into arrays.

Every user-caused problem (a page out of range, mismatched lengths, a batch
over the limits, a malformed mask) raises `BatchError` naming the request and
the numbers, before any device work, so a bad batch never leaves the KV pool
half-written and the engine serves the next batch as usual.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from pie.engine import brle
from pie.engine.attention.base import BatchLayout
from pie.engine.batch import ForwardBatch, OutputSpec, Request
from pie.errors import BatchError


@dataclass(frozen=True)
class Limits:
    num_pages: int
    page_size: int
    vocab_size: int
    max_batch_tokens: int
    max_batch_size: int
    max_dist_size: int
    max_num_embeds: int
    num_swap_slots: int = 0


@dataclass
class OutputRow:
    request: int
    slot: int  # index into requests[request].outputs
    row: int  # row in the flattened token batch
    spec: OutputSpec
    position: int
    seed: int


@dataclass
class PreparedBatch:
    tokens: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    write_page: np.ndarray  # [T] int64
    write_offset: np.ndarray  # [T] int64
    layout: BatchLayout
    outputs: list[OutputRow]
    logit_masks: dict[int, np.ndarray]  # request -> bool [vocab]


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


def _check_slot(slot: int, limits: Limits) -> None:
    if not 0 <= slot < limits.num_swap_slots:
        raise BatchError(f"swap slot {slot} is out of range: the host swap pool has {limits.num_swap_slots} slots "
                         "(set swap_pool_size or cpu_mem_budget_in_gb to enable or enlarge it)")


def prepare(batch: ForwardBatch, limits: Limits, rng: random.Random) -> PreparedBatch:
    reqs = batch.requests
    check_page_ops(batch, limits)
    if not reqs:
        raise BatchError("empty batch: at least one request is needed")
    if len(reqs) > limits.max_batch_size:
        raise BatchError(f"batch has {len(reqs)} requests, over max_batch_size = {limits.max_batch_size}; "
                         "split it or raise max_batch_size")
    num_tokens = batch.num_tokens
    if num_tokens > limits.max_batch_tokens:
        raise BatchError(f"batch has {num_tokens} tokens, over max_batch_tokens = {limits.max_batch_tokens}; "
                         "chunk the prefill or raise max_batch_tokens")
    qo_indptr = np.zeros(len(reqs) + 1, np.int32)
    kv_page_indptr = np.zeros(len(reqs) + 1, np.int32)
    kv_lens = np.zeros(len(reqs), np.int32)
    pages, pos, toks, w_page, w_off = [], [], [], [], []
    masks: list[np.ndarray | None] = []
    outputs: list[OutputRow] = []
    logit_masks: dict[int, np.ndarray] = {}
    for i, r in enumerate(reqs):
        kv_len, page_arr = _check_request(i, r, limits)
        q_len = len(r.tokens)
        qo_indptr[i + 1] = qo_indptr[i] + q_len
        kv_page_indptr[i + 1] = kv_page_indptr[i] + len(r.page_ids)
        kv_lens[i] = kv_len
        pages.append(page_arr)
        toks.append(r.tokens)
        pos.append(r.positions)
        new_slots = np.arange(kv_len - q_len, kv_len)
        w_page.append(page_arr[new_slots // limits.page_size])
        w_off.append(new_slots % limits.page_size)
        masks.append(_attention_mask(i, r, kv_len))
        if r.logit_mask:
            logit_masks[i] = _logit_mask(i, r.logit_mask, limits.vocab_size)
        seed = r.seed if r.seed is not None else rng.getrandbits(63)
        outputs += [OutputRow(i, j, int(qo_indptr[i]) + o.index, o, r.positions[o.index], seed)
                    for j, o in enumerate(r.outputs)]
    tokens = np.concatenate([np.asarray(t, np.int64) for t in toks])
    if tokens.min() < 0 or tokens.max() >= limits.vocab_size:
        bad = int(tokens[(tokens < 0) | (tokens >= limits.vocab_size)][0])
        raise BatchError(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    layout = BatchLayout(
        qo_indptr=qo_indptr,
        kv_page_indptr=kv_page_indptr,
        kv_page_indices=np.concatenate(pages).astype(np.int32),
        kv_last_page_len=np.array([r.last_page_len for r in reqs], np.int32),
        kv_lens=kv_lens,
        custom_masks=masks,
    )
    return PreparedBatch(tokens, np.concatenate([np.asarray(p, np.int64) for p in pos]),
                         np.concatenate(w_page).astype(np.int64), np.concatenate(w_off).astype(np.int64),
                         layout, outputs, logit_masks)


def _check_page(page: int, limits: Limits, what: str) -> None:
    if not 0 <= page < limits.num_pages:
        raise BatchError(f"{what} page id {page} is out of range: the pool has pages 0..{limits.num_pages - 1}")


def _check_request(i: int, r: Request, limits: Limits) -> tuple[int, np.ndarray]:
    q_len = len(r.tokens)
    if q_len == 0:
        raise BatchError(f"request {i} has no input tokens")
    if len(r.positions) != q_len:
        raise BatchError(f"request {i} has {q_len} tokens but {len(r.positions)} positions; they must match")
    if not r.page_ids:
        raise BatchError(f"request {i} has no KV pages")
    page_arr = np.asarray(r.page_ids, np.int64)
    if page_arr.min() < 0 or page_arr.max() >= limits.num_pages:
        bad = int(page_arr[(page_arr < 0) | (page_arr >= limits.num_pages)][0])
        raise BatchError(f"request {i} uses page id {bad}, out of range: the pool has pages "
                         f"0..{limits.num_pages - 1}")
    if not 1 <= r.last_page_len <= limits.page_size:
        raise BatchError(f"request {i} has last_page_len {r.last_page_len}; it must be in 1..{limits.page_size}")
    kv_len = (len(r.page_ids) - 1) * limits.page_size + r.last_page_len
    if kv_len < q_len:
        raise BatchError(f"request {i} writes {q_len} tokens but its pages hold only {kv_len} slots "
                         "(pages * page_size, with the last page filled to last_page_len)")
    if min(r.positions) < 0:
        raise BatchError(f"request {i} has a negative position")
    num_embeds = 0
    for j, o in enumerate(r.outputs):
        if not 0 <= o.index < q_len:
            raise BatchError(f"request {i} output {j} reads row {o.index}, but the request has {q_len} rows")
        if (o.sampler is None) == (o.probe is None):
            raise BatchError(f"request {i} output {j} must have exactly one of sampler or probe")
        _check_output(i, j, o, limits)
        num_embeds += o.probe is not None and o.probe.kind == "embedding"
    if num_embeds > limits.max_num_embeds:
        raise BatchError(f"request {i} asks for {num_embeds} embeddings, over max_num_embeds = "
                         f"{limits.max_num_embeds}")
    return kv_len, page_arr


def _check_output(i: int, j: int, o: OutputSpec, limits: Limits) -> None:
    where = f"request {i} output {j}"
    if o.sampler is not None:
        s = o.sampler
        if s.temperature < 0 or s.top_k < 0 or not 0.0 < s.top_p <= 1.0 or not 0.0 <= s.min_p <= 1.0:
            raise BatchError(f"{where}: sampler parameters out of range (temperature >= 0, top_k >= 0, "
                             f"0 < top_p <= 1, 0 <= min_p <= 1): {s}")
        if s.draws < 1:
            raise BatchError(f"{where}: draws must be >= 1, got {s.draws}")
        return
    p = o.probe
    assert p is not None
    if p.kind == "distribution" and p.k > limits.max_dist_size:
        raise BatchError(f"{where}: distribution of {p.k} entries is over max_dist_size = "
                         f"{limits.max_dist_size}; ask for fewer or raise max_dist_size")
    if p.kind in ("logprob", "logprobs"):
        if not p.tokens:
            raise BatchError(f"{where}: {p.kind} probe needs at least one token")
        bad = [t for t in p.tokens if not 0 <= t < limits.vocab_size]
        if bad:
            raise BatchError(f"{where}: token {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
        if len(p.tokens) > limits.vocab_size:
            raise BatchError(f"{where}: more logprob tokens than the vocabulary holds")


def _attention_mask(i: int, r: Request, kv_len: int) -> np.ndarray | None:
    if r.attention_mask is None:
        return None
    if len(r.attention_mask) != len(r.tokens):
        raise BatchError(f"request {i} has {len(r.tokens)} tokens but {len(r.attention_mask)} attention-mask rows")
    try:
        mask = np.stack([brle.decode(row, kv_len) for row in r.attention_mask])
    except ValueError as e:
        raise BatchError(f"request {i} attention mask: {e} (each row must cover the kv length {kv_len})") from e
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise BatchError(f"request {i} attention mask row {int(empty[0])} attends to nothing")
    return mask


def _logit_mask(i: int, runs: list[int], vocab_size: int) -> np.ndarray:
    try:
        mask = brle.decode(runs)
    except ValueError as e:
        raise BatchError(f"request {i} logit mask: {e}") from e
    if mask.size > vocab_size:
        raise BatchError(f"request {i} logit mask covers {mask.size} tokens, over the vocabulary of {vocab_size}")
    if not mask.any():
        raise BatchError(f"request {i} logit mask allows no token")
    # Shorter masks (tokenizer vocab < embedding rows) leave the padding ids disallowed.
    return np.pad(mask, (0, vocab_size - mask.size))
