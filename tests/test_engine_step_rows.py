"""Decode steps as arrays (`ForwardBatch.steps`, what the runtime's stream lane sends): the engine runs them
natively and gives the tokens the same rows give as requests, beside ordinary requests in one batch,
with samplers, seeds and logit masks per row; and a step reads nothing back beyond the step's one copy."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import SeqPager, make_engine
from test_engine_step import counting_readbacks

from pie.engine import brle
from pie.engine.batch import ForwardBatch, OutputSpec, Request, Sampler, StepRows, run_expanded
from pie.engine.engine import Engine

SAMPLERS = [Sampler(), Sampler("top_k", 0.8, top_k=5), Sampler("top_p", 1.2, top_p=0.9)]


@pytest.fixture(scope="module")
def engine(checkpoint_dir):  # type: ignore[no-untyped-def]
    return make_engine(checkpoint_dir("qwen3"), max_num_kv_pages=256)


def _prefilled(engine: Engine, n: int) -> tuple[SeqPager, list[int]]:
    """n sequences of different lengths, prefilled; their next input token each."""
    pager = SeqPager(engine)
    reqs = [pager.request(i, [(7 * i + j) % 50 + 1 for j in range(3 + 5 * i)], []) for i in range(n)]
    engine.forward_batch(ForwardBatch(reqs))
    return pager, [(11 * i) % 50 + 2 for i in range(n)]


def _steps(pager: SeqPager, seqs: range, tokens: list[int], masked: bool) -> StepRows:
    reqs = [pager.request(i, [tokens[i]], []) for i in seqs]
    indptr = np.zeros(len(reqs) + 1, np.int64)
    np.cumsum([len(r.page_ids) for r in reqs], out=indptr[1:])
    vocab_mask = brle.encode([t % 3 != 0 for t in range(64)]) if masked else None
    return StepRows(np.array([r.tokens[0] for r in reqs], np.int64), np.array([r.positions[0] for r in reqs]),
                    indptr, np.concatenate([r.page_ids for r in reqs]).astype(np.int32),
                    np.array([r.last_page_len for r in reqs]), SAMPLERS,
                    np.array([i % len(SAMPLERS) for i in seqs], np.int64),
                    seeds=[100 + i for i in seqs], logit_masks=[vocab_mask if i % 2 else None for i in seqs])


@pytest.mark.parametrize("masked", [False, True])
def test_step_rows_give_the_tokens_of_the_same_rows_as_requests(engine: Engine, masked: bool) -> None:
    pager, tokens = _prefilled(engine, 6)
    before = dict(pager.kv_len), {k: list(v) for k, v in pager.pages.items()}
    # Requests 0-1 ordinary, rows 2-5 as arrays, in one batch.
    ordinary = [pager.request(i, [tokens[i]], [OutputSpec(0, SAMPLERS[0])]) for i in range(2)]
    steps = _steps(pager, range(2, 6), tokens, masked)
    native = engine.forward_batch(ForwardBatch(ordinary, steps=steps))
    assert native.steps is not None and native.steps.dtype == np.int64 and len(native.steps) == 4

    # The same KV writes again (same slots, same pages), as requests only.
    pager.kv_len, pager.pages = before
    again = [pager.request(i, [tokens[i]], [OutputSpec(0, SAMPLERS[0])]) for i in range(2)]
    expanded = run_expanded(engine.forward_batch, ForwardBatch(again, steps=_steps(pager, range(2, 6), tokens,
                                                                                   masked)))
    assert native.outputs == expanded.outputs
    assert expanded.steps is not None and native.steps.tolist() == expanded.steps.tolist()
    if masked:  # the odd rows kept to the allowed tokens
        assert all(t % 3 != 0 for t in native.steps[1::2].tolist())


def test_a_batch_of_step_rows_alone_copies_once_each_way(engine: Engine) -> None:
    pager, tokens = _prefilled(engine, 4)
    steps = _steps(pager, range(4), tokens, masked=False)
    with counting_readbacks() as reads:
        result = engine.forward_batch(ForwardBatch([], steps=steps, validated=True))
    assert result.outputs == [] and result.steps is not None and len(result.steps) == 4
    assert sum(reads.values()) == 0, reads


def test_an_unresolved_chained_block_is_a_batch_error(engine: Engine) -> None:
    from pie.errors import BatchError

    pager, tokens = _prefilled(engine, 2)
    steps = _steps(pager, range(2), tokens, masked=False)
    steps.token_from = np.array([0, -1])
    with pytest.raises(BatchError, match="unresolved"):
        engine.forward_batch(ForwardBatch([Request([1], [0], [0], 1)], steps=steps))
